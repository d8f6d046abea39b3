"""Each Keras backend's host path, one module each, behind one interface.

A backend module has:

- ``host_dtypes(offload_state) -> (variable dtypes, state dtypes)``: what
  its host path takes (``offload_state``, here and below: whether the state
  is host memory of ours, offloaded or 8-bit);
- ``unsupported_reason(variable, offload_state) -> str | None``: why the host
  kernel cannot update this Keras variable (of a ``host_dtypes`` dtype) here (its
  device, its distribution), or None when it can;
- ``saved_value(variable) -> np.ndarray``: a Keras variable's value as a
  `.keras` file stores it;
- ``as_keras_updates_it(variable)``: a Keras variable as Keras's own
  optimizer hands it to its weight-decay check, whose ``name`` its
  ``exclude_from_weight_decay(var_names=...)`` searches (TF: the raw
  ``tf.Variable``, named by its path and ``:0``);
- ``eagerly()``: a context in which assignments run now, also where
  ``build`` is called inside a traced step (TF), not as part of the trace;
- ``dense(gradient)``: a sparse gradient of this backend as a dense tensor,
  duplicate rows summed as the dense gradient has them;
- ``HostPath(optimizer)``, made at ``build``, with
  ``falls_back_to_ops(grads) -> bool`` (whether this step, or this trace,
  takes the ops path after all), ``update_step(grads, variables, learning_rate, indices)`` (one
  step in the host kernel, through the optimizer's ``_run_kernel``) and
  ``ops_update_step(...) -> bool`` (the backend's fastest update where the
  host kernel does not run; False, having done nothing, leaves the step to
  the keras.ops update).

A module imports its backend's library only when called, and only the module
of the backend Keras runs on is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import keras


def current() -> ModuleType:
    """The module of the backend Keras runs on."""
    return importlib.import_module(f"keras_adamw.backends.{keras.backend.backend()}")
