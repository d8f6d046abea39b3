"""`keras_adamw.AdamW`: AdamW for Keras 3 over backend-neutral `keras.ops`."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_adamw import backends, host, rounding, sharding
from keras_adamw._checks import flag as _flag
from keras_adamw._checks import real as _real

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule
# Keras ships no types: what a schedule is, for annotations.
Schedule = Any

EPSILON_MODES = ("keras", "torch")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
IMPLEMENTATIONS = ("auto", "ops", "host")
STATE_DTYPES = ("float32", "bfloat16", "int8")


@keras.saving.register_keras_serializable(package="keras_adamw")
class AdamW(keras.optimizers.Optimizer):  # type: ignore[misc]  # Keras is untyped
    """AdamW with parameter groups, serializable decay exclusions and a
    schedulable, decoupled weight decay; a drop-in for `keras.optimizers.AdamW`.

    Per variable ``p`` with gradient ``g`` at step ``t`` (1-based), learning
    rate ``lr_t`` (times the variable's ``lr_multipliers`` factor) and weight
    decay ``wd_t`` (times its ``weight_decay_multipliers`` factor, 0 if
    excluded)::

        coupled:    p ← p − lr_t·wd_t·p                (Keras, torch)
        decoupled:  p ← p − (lr_t/lr_peak)·wd_t·p      (the paper: only the schedule's shape)
        m ← m + (1 − β₁)(g − m);  v ← v + (1 − β₂)(g² − v);  v̂ ← max(v̂, v) with AMSGrad
        keras:  p ← p − lr_t·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v̂ + ε)
        torch:  p ← p − lr_t/(1−β₁ᵗ) · m / (√v̂/√(1−β₂ᵗ) + ε)

    Args:
        learning_rate: a float, a `LearningRateSchedule`, or a callable taking
            no arguments.
        weight_decay: a float or a `LearningRateSchedule` (of the step). A
            float is held in a variable, so assigning ``optimizer.weight_decay``
            later takes effect inside compiled train steps too.
        beta_1, beta_2, epsilon, amsgrad: as in `keras.optimizers.AdamW`.
        epsilon_mode: ``"keras"`` (ε added to √v) or ``"torch"`` (ε added to √v̂).
        weight_decay_mode: ``"coupled"`` or ``"decoupled"``; decoupled needs a
            float learning rate or a schedule whose peak is known
            (``peak_value``, ``warmup_target``, ``initial_learning_rate``).
        exclude_from_weight_decay: regular expressions searched in each
            ``variable.path``; matching variables are not decayed.
        lr_multipliers, weight_decay_multipliers: ``{pattern: factor}``;
            the first pattern found in ``variable.path`` gives its factor
            (1 if none matches).
        maximize: ascend instead of descend.
        implementation: ``"ops"`` (keras.ops; on torch, ``torch._foreach``
            ops per parameter group, as Keras's torch AdamW); ``"host"``, the Rust kernel on
            variables in CPU memory: in place on torch, an XLA custom call on
            the donated buffers inside JAX's compiled step (on each device's
            shards under a `keras.distribution`), a TensorFlow op of ours
            whose new values TF's variables adopt (not under XLA: compile
            with ``jit_compile=False``); or ``"auto"``:
            host where it can run, else ops (and ops under TF's XLA, and
            in JAX steps jitted outside Keras's trainer, which may not
            donate the state; pass ``"host"`` there if yours does).
        offload_state: keep m, v (and v̂) as NumPy arrays in host memory
            instead of Keras variables; the host kernel updates them in
            place, and only parameters and gradients cross (JAX on CPU: by
            reference from the compiled step, under a `keras.distribution`
            one block per device, 1/N with ``shard_state``; JAX on an
            accelerator: an ordered host callback; TF: an op of ours; torch:
            in place on CPU variables, through host staging buffers for
            variables on an accelerator).
        shard_state: under a `keras.distribution` with a data-parallel axis
            (``DataParallel``, or a ``ModelParallel`` mesh's batch axis), lay
            out m, v (and v̂) sharded along that axis, as ZeRO stage 1 does:
            each device holds and updates 1/N of the state, XLA gathers what
            the parameters need. A variable's model-axis sharding is kept;
            without a distribution, or with one device, nothing changes.
        master_weights: for bfloat16 and float16 variables, keep float32
            master copies (optimizer variables named ``master``) that the
            update runs on; each step the variable receives its master rounded
            to nearest. ``None`` (the default) and ``True``: masters for every
            16-bit variable; ``False``: none. Float32 variables are their own
            masters; float64 ones with ``True`` raise.
        state_dtype: the dtype of m, v (and v̂): ``"float32"`` (float64
            for float64 variables), ``"bfloat16"`` (half the memory) or
            ``"int8"`` (8-bit block-wise, `keras_adamw.host.QuantizedState`:
            about a quarter; host arrays that only the host kernel updates,
            so with masters, if any, in host memory too). The update
            always computes in float32 (or float64)
            and rounds what it stores.
        stochastic_rounding: round stochastically (unbiased: steps below half
            a 16-bit step add up in expectation) where a 16-bit value is
            stored: variables without masters, and bfloat16 state. The random
            bits come from a `keras.random.SeedGenerator` seeded as Keras
            seeds (``keras.utils.set_random_seed``), saved with the optimizer.
        **kwargs: the base optimizer's options (``clipnorm``, ``clipvalue``,
            ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
            ``ema_overwrite_frequency``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``, ``name``).

    Saved state, in this fixed order (how a `.keras` file stores it, and what
    ``get_weights``/``set_weights`` use): ``iteration``, ``learning_rate``
    (float learning rate only), then the base optimizer's (EMA averages,
    gradient accumulators) when enabled, then for each trainable variable
    its ``momentum`` and ``velocity`` (interleaved, as in Keras's Adam), then
    each ``velocity_hat`` (AMSGrad only): exactly what
    `keras.optimizers.AdamW` saves, so files cross both ways. Then what only
    ours has: each ``master`` (16-bit variables with masters) and the
    stochastic rounding generator's state (``stochastic_rounding`` only). A
    float ``weight_decay`` is an optimizer variable too, but not saved state:
    the config carries it, as Keras's float. With ``offload_state`` the slots
    are host arrays, saved in the same places, so a file loads the same with
    or without offloading. Files of keras_adamw 0.1 (``weight_decay`` after
    ``learning_rate``) load too. Weights loaded before ``build`` are kept and
    assigned by it.
    """

    def __init__(
        self,
        learning_rate: float | Schedule | Callable[[], Any] = 0.001,
        weight_decay: float | Schedule = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        *,
        epsilon_mode: str = "keras",
        weight_decay_mode: str = "coupled",
        exclude_from_weight_decay: Sequence[str] | None = None,
        lr_multipliers: Mapping[str, float] | None = None,
        weight_decay_multipliers: Mapping[str, float] | None = None,
        maximize: bool = False,
        implementation: str = "auto",
        offload_state: bool = False,
        shard_state: bool = False,
        master_weights: bool | None = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        learning_rate = _checked_learning_rate(learning_rate)  # the base class takes a float
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.beta_1 = _checked_beta("beta_1", beta_1)
        self.beta_2 = _checked_beta("beta_2", beta_2)
        epsilon_value = _real(epsilon)
        if epsilon_value is None or not 0 < epsilon_value < math.inf:
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        _check_choice("epsilon_mode", epsilon_mode, EPSILON_MODES)
        _check_choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
        self.epsilon = epsilon_value
        self.amsgrad = _flag("amsgrad", amsgrad)
        self.epsilon_mode = epsilon_mode
        self.weight_decay_mode = weight_decay_mode
        self.maximize = _flag("maximize", maximize)
        offload_state = _flag("offload_state", offload_state)
        _check_choice("implementation", implementation, IMPLEMENTATIONS)
        if offload_state and implementation == "ops":
            raise ValueError(
                "offload_state=True keeps the state in host memory: "
                'it needs implementation="host" or "auto", not "ops"'
            )
        self.implementation = implementation
        self.offload_state = offload_state
        self.shard_state = _flag("shard_state", shard_state)
        self.master_weights = (
            None if master_weights is None else _flag("master_weights", master_weights)
        )
        _check_choice("state_dtype", state_dtype, STATE_DTYPES)
        if state_dtype == "int8" and implementation == "ops":
            raise ValueError(
                "state_dtype='int8' is 8-bit block-wise state that only the host kernel "
                'updates: it needs implementation="host" or "auto", not "ops"'
            )
        self.state_dtype = state_dtype
        # 8-bit state is host memory of ours, as offloaded state is.
        self._state_in_host_memory = offload_state or state_dtype == "int8"
        self.stochastic_rounding = _flag("stochastic_rounding", stochastic_rounding)
        self._exclude_patterns = _compile_patterns(
            "exclude_from_weight_decay", exclude_from_weight_decay or []
        )
        self._lr_multipliers = _compile_multipliers("lr_multipliers", lr_multipliers)
        self._weight_decay_multipliers = _compile_multipliers(
            "weight_decay_multipliers", weight_decay_multipliers
        )
        self._peak_learning_rate = (
            _peak_learning_rate(learning_rate) if weight_decay_mode == "decoupled" else None
        )
        self._weight_decay = self._build_weight_decay(weight_decay)
        _OWNERS[id(self._iterations)] = self  # see set_weights
        # A saved state loaded before build, which build assigns.
        self._unbuilt_state: list[np.ndarray] | None = None
        # Keras on its torch backend multiplies by the float32 factor (1 − lr·wd);
        # elsewhere it subtracts p·wd·lr (and XLA may rewrite a product into
        # that). Float32 rounds the two apart by up to ~1e-6 over 100 steps, so
        # both paths follow what Keras does on this backend.
        self._multiplicative_decay = keras.backend.backend() == "torch"

    # -- weight decay: a variable (float) or a schedule ------------------------

    def _build_weight_decay(self, weight_decay: Any) -> Any:
        if isinstance(weight_decay, LearningRateSchedule):
            return weight_decay
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                _checked_weight_decay(weight_decay),
                name="weight_decay",
                dtype=keras.config.floatx(),
                trainable=False,
                aggregation="only_first_replica",
            )
        self._track_variable(variable)
        return variable

    @property
    def weight_decay(self) -> Any:
        """The weight decay now: the variable's value, or the schedule at this step."""
        if not hasattr(self, "_weight_decay"):
            return None  # the base class reads it during its own __init__
        if isinstance(self._weight_decay, LearningRateSchedule):
            # Called as the base class calls a learning rate schedule.
            return self._weight_decay(self._iterations)
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, value: Any) -> None:
        if not hasattr(self, "_weight_decay"):
            return  # the base class's __init__ sets None; ours builds the real one
        if isinstance(self._weight_decay, LearningRateSchedule) or isinstance(
            value, LearningRateSchedule
        ):
            raise TypeError(
                "weight_decay can be reassigned only from a float to a float: the number "
                "of optimizer variables must not change. Create a new optimizer to switch "
                "between a float and a schedule."
            )
        self._weight_decay.assign(_checked_weight_decay(value))

    # -- parameter groups -----------------------------------------------------

    def exclude_from_weight_decay(
        self, var_list: Sequence[Any] | None = None, var_names: Sequence[str] | None = None
    ) -> None:
        """Keras's method, with Keras's semantics: each call replaces the last,
        ``var_names`` are searched in ``variable.name`` (on TF, as Keras's TF
        optimizer sees it: the path and ``:0``), nothing of it is saved, and
        a call after ``build`` applies from the next step (the next trace, in
        a compiled step). The constructor's ``exclude_from_weight_decay``
        (patterns searched in ``variable.path``) is saved in the config. A
        variable that either excludes is not decayed."""
        super().exclude_from_weight_decay(var_list, var_names)
        if self.built:
            self._variable_factors = [self._factors_for(v) for v in self._trainable_variables]

    def _factors_for(self, variable: Any) -> tuple[float, float]:
        """(lr factor, weight decay factor) for a Keras variable."""
        path = _path(variable)
        lr_factor = _first_match(self._lr_multipliers, path)
        excluded = any(p.search(path) for p in self._exclude_patterns)
        excluded = excluded or not self._use_weight_decay(
            backends.current().as_keras_updates_it(variable)
        )
        wd_factor = 0.0 if excluded else _first_match(self._weight_decay_multipliers, path)
        return lr_factor, wd_factor

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        # What the options cannot do raises here, before anything is built.
        self._check_dtypes(var_list)
        on_host = self._resolve_implementation(var_list)
        super().build(var_list)
        self._on_host = on_host
        # Resolved here, where the variables still have their paths (TF's
        # update_step sees raw tf.Variables); update_step looks them up by index.
        self._variable_factors = [self._factors_for(v) for v in var_list]
        self._host_path = backends.current().HostPath(self)
        if self._state_in_host_memory:
            # Host memory owned by the optimizer, not Keras variables; none for the
            # variables Keras gives no slots (overwrite_with_gradient: float8 scales).
            # Written now (np.full, not np.zeros' untouched pages), as Keras
            # variables are: memory that does not fit fails here, not mid-step.
            moments = [1, 2, 2] if self.amsgrad else [1, 2]
            state = [
                [
                    None
                    if self._overwrite_variable_with_gradient(v)
                    else self._host_slot(v, moment)
                    for v in var_list
                ]
                for moment in moments
            ]
        else:  # Keras's Adam order: momentum and velocity interleaved, then velocity_hat
            with self._adding_slots(self._state_dtype_of):
                state = list(self.add_optimizer_variables(var_list, ["momentum", "velocity"]))
                if self.amsgrad:
                    state.append(self.add_optimizer_variables(var_list, "velocity_hat"))
        self._momentums, self._velocities = state[0], state[1]
        if self.amsgrad:
            self._velocity_hats = state[2]
        with self._adding_slots(lambda variable: "float32"):
            self._masters = [
                self._new_master(v) if self._keeps_master(v) else None for v in var_list
            ]
        # Whether any value is stored in a dtype other than its variable's.
        self._mixed_dtypes = any(master is not None for master in self._masters) or any(
            slot is not None and _dtype(slot) != _dtype(variable)
            for slots in ([] if self._state_in_host_memory else self._slot_lists())
            for slot, variable in zip(slots, var_list, strict=True)
        )
        self._seed_generator = None
        if self.stochastic_rounding:
            with keras.name_scope(self.name, caller=self):
                self._seed_generator = keras.random.SeedGenerator(name="stochastic_rounding")
            self._track_variable(self._seed_generator.state)
        unbuilt_state, self._unbuilt_state = self._unbuilt_state, None
        if unbuilt_state is not None:  # loaded before build: see load_own_variables
            with backends.current().eagerly():
                self._load_state(unbuilt_state)

    def _host_slot(self, variable: Any, moment: int) -> Any:
        """A slot of ``variable`` in host memory: an array of the state dtype,
        or 8-bit block-wise; under a distribution, one such block per device."""

        def block(shape: tuple[int, ...]) -> Any:
            if self.state_dtype == "int8":
                state = host.QuantizedState(shape, moment=moment)
                state.codes.fill(0)  # touched now, as np.full touches an array's pages
                return state
            return np.full(shape, 0.0, host._dtype(self.state_dtype))

        split = sharding.host_state_sharding(variable, self.shard_state)
        shape = tuple(variable.shape)
        return block(shape) if split is None else sharding.HostShards(shape, split, block)

    def _new_master(self, variable: Any) -> Any:
        """A float32 copy of ``variable``: an optimizer variable, or a host
        array when the state is in host memory. Its value is read eagerly and
        made the initial value: TF may build inside a traced step, where an
        assignment would join the step's graph instead."""
        value = backends.current().saved_value(variable).astype(np.float32)
        split = sharding.host_state_sharding(variable, self.shard_state)
        if self._state_in_host_memory and split is not None:
            master = sharding.HostShards(value.shape, split, lambda s: np.empty(s, np.float32))
            master.assign(value)
            return master
        if self._state_in_host_memory:
            return value
        return self.add_variable_from_reference(
            variable, "master", initializer=lambda shape, dtype: value
        )

    def _keeps_master(self, variable: Any) -> bool:
        return self.master_weights is not False and _dtype(variable) in rounding.SIXTEEN_BIT

    def _state_dtype_of(self, variable: Any) -> str:
        if self.state_dtype == "bfloat16":
            return "bfloat16"
        return "float64" if _dtype(variable) == "float64" else "float32"

    def _check_dtypes(self, var_list: list[Any]) -> None:
        """A clear error at build for what the dtype options cannot do."""
        for variable in var_list:
            dtype = _dtype(variable)
            if dtype not in ("float32", "float64", *rounding.SIXTEEN_BIT):
                raise ValueError(
                    f"{_path(variable)} is {dtype}: AdamW updates bfloat16, float16, float32 "
                    "and float64 variables"
                )
            if dtype == "float64" and self.master_weights:
                raise ValueError(
                    f"master_weights=True keeps float32 masters of 16-bit variables, but "
                    f"{_path(variable)} is float64: its own float64 values are finer"
                )
            if dtype == "float64" and self.state_dtype != "float32":
                raise ValueError(
                    f"state_dtype={self.state_dtype!r} is for 16- and 32-bit variables, but "
                    f"{_path(variable)} is float64"
                )
        rounded = [v for v in var_list if _dtype(v) in rounding.SIXTEEN_BIT]
        if (
            self.stochastic_rounding
            and self.state_dtype == "float32"
            and all(self._keeps_master(v) for v in rounded)
        ):
            raise ValueError(
                "stochastic_rounding=True needs something to round: 16-bit variables with "
                "master_weights=False, or state_dtype='bfloat16'"
            )

    @contextlib.contextmanager
    def _adding_slots(self, dtype_of: Callable[[Any], str]) -> Iterator[None]:
        """Within, `add_variable_from_reference` makes our slots, of ``dtype_of(variable)``."""
        self._slot_dtype_of: Callable[[Any], str] | None = dtype_of
        try:
            yield
        finally:
            self._slot_dtype_of = None

    def add_variable_from_reference(
        self, reference_variable: Any, name: str | None = None, initializer: Any = "zeros"
    ) -> Any:
        """As Keras's, but our slots take their dtype from ``state_dtype`` (or
        float32, for masters) and the sharded layout of `shard_state`."""
        dtype_of = getattr(self, "_slot_dtype_of", None)
        if dtype_of is None:  # the base optimizer's own (EMA, gradient accumulators)
            return super().add_variable_from_reference(reference_variable, name, initializer)
        layout = sharding.state_layout(reference_variable) if self.shard_state else None
        return self.add_variable(
            shape=reference_variable.shape,
            initializer=initializer,
            dtype=dtype_of(reference_variable),
            name=f"{_path(reference_variable).replace('/', '_').replace(':', '_')}_{name}",
            layout=getattr(reference_variable, "_layout", None) if layout is None else layout,
        )

    def _resolve_implementation(self, var_list: list[Any]) -> bool:
        """Whether the update runs in the host kernel."""
        in_host_memory = self._state_in_host_memory
        reason = _host_unsupported_reason(var_list, in_host_memory)
        _, state_dtypes = backends.current().host_dtypes(in_host_memory)
        if self.state_dtype not in state_dtypes:
            where = "8-bit state is host memory" if self.state_dtype == "int8" else "runs on ops"
            reason = (
                f"{' or '.join(state_dtypes)} state on {keras.backend.backend()}"
                f"{' when offloaded' if self.offload_state else ''} "
                f"(state_dtype={self.state_dtype!r}: {where})"
            )
        if self.implementation == "ops":
            return False
        if self.implementation == "auto" and not self._state_in_host_memory:
            # Measured faster than ops on CPU on every backend (benchmarks/), and
            # about even with TF's XLA, where auto falls back to ops anyway.
            return reason is None
        if reason is not None:
            needs = (
                "offload_state=True"
                if self.offload_state
                else 'state_dtype="int8"'
                if self.state_dtype == "int8"
                else 'implementation="host"'
            )
            raise ValueError(f"{needs} needs {reason}")
        return True

    # -- the update -------------------------------------------------------------

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        """The base class decays before update_step; ours decays inside it."""

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        dense = backends.current().dense
        grads = [dense(grad) for grad in grads]
        indices = [self._get_variable_index(v) for v in trainable_variables]
        path = self._host_path
        if self._on_host and not path.falls_back_to_ops(grads):
            path.update_step(grads, trainable_variables, learning_rate, indices)  # the Rust kernel
        elif not path.ops_update_step(grads, trainable_variables, learning_rate, indices):
            super()._backend_update_step(grads, trainable_variables, learning_rate)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        index = self._get_variable_index(variable)
        lr_factor, wd_factor = self._variable_factors[index]
        master = self._masters[index]
        weights = variable if master is None else master
        # 16-bit values compute in float32, rounded once where they are stored.
        dtype = "float32" if _dtype(variable) in rounding.SIXTEEN_BIT else _dtype(variable)
        lr = ops.cast(learning_rate, dtype)
        if lr_factor != 1.0:
            lr = lr * lr_factor
        gradient = ops.cast(gradient, dtype)
        if self.maximize:
            gradient = ops.negative(gradient)
        slots = [s[index] for s in self._slot_lists()]
        # Nothing to round: update the variables in place, as Keras's AdamW
        # does, so that no step holds new m, v and p beside the old ones.
        in_place = master is None and all(_dtype(x) == dtype for x in [weights, *slots])
        p = ops.cast(weights, dtype)
        if wd_factor != 0.0:
            into = weights if in_place else None
            p = self._decayed(p, lr, ops.cast(learning_rate, dtype), wd_factor, into)

        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, dtype), local_step)
        m, v = (ops.cast(x, dtype) for x in slots[:2])
        m = self._add(
            slots[0], m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1), in_place
        )
        g2 = ops.square(gradient)
        v = self._add(slots[1], v, ops.multiply(ops.subtract(g2, v), 1 - self.beta_2), in_place)
        if self.amsgrad:
            v = ops.maximum(ops.cast(slots[2], dtype), v)
            self._store(slots[2], v)
        if self.epsilon_mode == "keras":
            alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            step = ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon))
        else:
            denominator = ops.sqrt(v) / ops.sqrt(1 - beta_2_power) + self.epsilon
            step = ops.divide(ops.multiply(m, lr / (1 - beta_1_power)), denominator)
        if in_place:
            self.assign_sub(weights, step)
            return
        p = ops.subtract(p, step)
        self._store(weights, p)
        if master is not None:
            self.assign(variable, ops.cast(p, variable.dtype))  # to nearest

    def _add(self, target: Any, current: Any, change: Any, in_place: bool) -> Any:
        """``current + change`` into ``target``: in place (the value is then
        ``target``'s), or stored, rounded as ``target`` stores."""
        if in_place:
            self.assign_add(target, change)
            return target
        value = ops.add(current, change)
        self._store(target, value)
        return value

    def _store(self, target: Any, value: Any) -> None:
        """``value`` into a variable of its dtype, or of a 16-bit one: rounded
        to nearest, or stochastically with ``stochastic_rounding``."""
        dtype = _dtype(target)
        if self.stochastic_rounding and dtype in rounding.SIXTEEN_BIT:
            random = rounding.random_bits(ops.shape(value), self._seed_generator)
            value = rounding.stochastic(value, dtype, random)
        self.assign(target, ops.cast(value, dtype))

    def _decayed(
        self, p: Any, lr: Any, schedule_lr: Any, wd_factor: float, into: Any = None
    ) -> Any:
        """``p`` after weight decay, before the Adam step, rounded as the
        reference rounds it; with ``into`` (p's variable), decayed in place
        and returned.

        ``lr`` is this variable's learning rate (its multiplier applied),
        ``schedule_lr`` the optimizer's.
        """
        wd = ops.cast(self.weight_decay, _dtype(p))
        if wd_factor != 1.0:
            wd = wd * wd_factor
        scale = self._decay_scale(lr, schedule_lr)
        if self._multiplicative_decay:
            decayed = p * (1 - wd * scale)  # p·(1 − lr·wd)
            if into is None:
                return decayed
            self.assign(into, decayed)
        elif into is None:
            return p - p * wd * scale  # p − p·wd·lr
        else:
            self.assign_sub(into, p * wd * scale)
        return into

    def _decay_scale(self, lr: Any, schedule_lr: Any) -> Any:
        """What multiplies the weight decay in its rate, on either path: the
        variable's learning rate (coupled), or the schedule's multiplier
        lr_t/lr_peak (decoupled; 1 for a constant learning rate)."""
        if self.weight_decay_mode == "coupled":
            return lr
        if self._peak_learning_rate is None:
            return 1.0
        return schedule_lr / self._peak_learning_rate

    # -- the host path: what every backend's module (keras_adamw/backends/) shares --

    def _slot_lists(self) -> list[list[Any]]:
        """[momenta, velocities] and, with AMSGrad, velocity_hats: one entry per variable."""
        return [self._momentums, self._velocities] + ([self._velocity_hats] if self.amsgrad else [])

    def _slots(self, indices: list[int]) -> tuple[list[Any], list[Any], list[Any] | None]:
        """(momenta, velocities, velocity_hats or None) of these variables: Keras
        variables, or host arrays when offloaded."""
        picked = [[slot[i] for i in indices] for slot in self._slot_lists()]
        return picked[0], picked[1], picked[2] if self.amsgrad else None

    def _groups(self, indices: list[int]) -> dict[tuple[float, float], list[int]]:
        """Positions in `indices` by (lr factor, weight-decay factor): one kernel call each."""
        groups: dict[tuple[float, float], list[int]] = {}
        for position, index in enumerate(indices):
            groups.setdefault(self._variable_factors[index], []).append(position)
        return groups

    def _kernel_calls(self, indices: list[int]) -> Iterator[tuple[float, float, bool, list[int]]]:
        """(lr factor, weight-decay factor, with masters, positions in
        `indices`): one kernel call each, per parameter group those without
        masters, then those with (the kernel takes copies for all of a
        call's params or none)."""
        for (lr_factor, wd_factor), group in self._groups(indices).items():
            for copied in (False, True):
                positions = [k for k in group if (self._masters[indices[k]] is not None) == copied]
                if positions:
                    yield lr_factor, wd_factor, copied, positions

    def _group_rates(self, lr: Any, wd: Any, lr_factor: float, wd_factor: float) -> tuple[Any, Any]:
        """A group's learning rate, and its decay's whole per-step rate as the ops path forms it."""
        group_lr = lr * lr_factor
        return group_lr, wd * wd_factor * self._decay_scale(group_lr, lr)

    def _kernel_options(self) -> dict[str, Any]:
        """The kernel's fixed options (the rates are per group and step)."""
        return {
            "epsilon_mode": self.epsilon_mode,
            "weight_decay_mode": "decoupled",  # the rate passed is the decay's whole rate
            "decay_form": "multiply" if self._multiplicative_decay else "subtract",
            "maximize": self.maximize,
        }

    def _run_kernel(
        self,
        step: int,
        lr: float,
        wd: float,
        indices: list[int],
        params: list[Any],
        grads: list[Any],
        slots: Sequence[Any],
        read_from: Sequence[Sequence[Any]] | None = None,
        copies: Sequence[Any] | None = None,
        seed: Any = None,
    ) -> None:
        """The host kernel over aligned lists, one call per `_kernel_calls`
        entry (out of place from `read_from`'s lists when given). For a
        variable with a master, ``params`` holds the master and ``copies``
        the variable's memory, which receives the new values rounded.
        ``seed``: stochastic rounding's, where the generator cannot be read
        (a JAX host callback); by default read from it."""
        momenta, velocities, velocity_hats = slots
        for lr_factor, wd_factor, copied, positions in self._kernel_calls(indices):
            group_lr, decay = self._group_rates(lr, wd, lr_factor, wd_factor)
            host.adamw_update(
                [params[k] for k in positions],
                [grads[k] for k in positions],
                [momenta[k] for k in positions],
                [velocities[k] for k in positions],
                amsgrad_max=None
                if velocity_hats is None
                else [velocity_hats[k] for k in positions],
                step=step,
                learning_rate=group_lr,
                beta_1=self.beta_1,
                beta_2=self.beta_2,
                epsilon=self.epsilon,
                weight_decay=decay,
                read_from=None
                if read_from is None
                else [[xs[k] for k in positions] for xs in read_from],
                param_copies=[copies[k] for k in positions] if copies and copied else None,
                **self._rounding([params[k].dtype for k in positions], copied, seed),
                **self._kernel_options(),
            )

    def _rounding(self, dtypes: list[Any], copied: bool, seed: Any = None) -> dict[str, Any]:
        """The kernel's rounding of a call on params of these dtypes, with
        or without copies (``seed``, if not given, read from the generator, eagerly)."""
        if not self._rounds_stochastically(dtypes, copied):
            return {}
        if seed is None:
            seed = self._rounding_seed()
        seed = np.asarray(ops.convert_to_numpy(seed))
        return {"rounding": "stochastic", "seed": int(seed.astype(np.int64)) % 2**64}

    def _rounds_stochastically(self, dtypes: list[Any], copied: bool) -> bool:
        """Whether a kernel call on params of these dtypes, with or without
        copies, has a 16-bit value to store (params without copies, bfloat16
        state) that ``stochastic_rounding`` asks to round stochastically."""
        sixteen_bit = not copied and any(str(d) in rounding.SIXTEEN_BIT for d in dtypes)
        return self.stochastic_rounding and (sixteen_bit or self.state_dtype == "bfloat16")

    def _rounding_seed(self) -> Any:
        """The kernel's seed: the generator's (the kernel keys each step's
        bits by the step, so the generator does not advance), saved with the
        optimizer, so a resumed run rounds alike."""
        assert self._seed_generator is not None
        return self._seed_generator.state[0]

    # -- the whole state: .keras files, get_weights and set_weights ------------------

    def _state(self, with_weight_decay: bool = False) -> list[Any]:
        """The whole state in Keras's order, the order of a `.keras` file and of
        `get_weights`/`set_weights`: the Keras variables, with any offloaded
        slots where Keras's Adam has its slot variables (each variable's
        momentum and velocity, interleaved, then each velocity_hat), then the
        masters and the rounding generator's state. So a file loads the same
        with or without offloading, and with `keras.optimizers.AdamW`: our
        weight_decay variable is a hyperparameter that the config carries, as
        Keras's float is (``with_weight_decay``: in its place among the
        variables, as files of keras_adamw 0.1 hold it)."""
        masters, generator = self._optional_state()
        optional = masters + generator
        skipped = optional if with_weight_decay else [self._weight_decay, *optional]
        state = [x for x in self.variables if not any(x is y for y in skipped)]
        if self.built and self._state_in_host_memory:
            pairs = zip(self._momentums, self._velocities, strict=True)
            state += [slot for pair in pairs for slot in pair if slot is not None]
            if self.amsgrad:
                state += [slot for slot in self._velocity_hats if slot is not None]
        return state + optional

    def _optional_state(self) -> tuple[list[Any], list[Any]]:
        """(masters, the rounding generator's state): what a configuration
        without master weights or stochastic rounding does not save."""
        if not self.built:
            return [], []
        masters = [master for master in self._masters if master is not None]
        generator = [] if self._seed_generator is None else [self._seed_generator.state]
        return masters, generator

    def _saved_layouts(self) -> Iterator[list[Any]]:
        """`_state()` as each configuration would have saved it, ours first
        (also `keras.optimizers.AdamW`'s), then with our weight_decay variable
        (keras_adamw 0.1), each with or without masters and the generator's
        state. Entries are our targets, or None for a saved value we do not
        keep. Before `build`, only the variables an optimizer has unbuilt."""
        masters, generator = self._optional_state()
        extra = len(masters + generator)
        cores = [self._state()[: -extra or None]]
        if isinstance(self._weight_decay, keras.Variable):
            cores.append(self._state(with_weight_decay=True)[: -extra or None])
        if not self.built:
            yield from cores
            return
        sixteen_bit = sum(
            _dtype(v) in rounding.SIXTEEN_BIT
            for v, m in zip(self._trainable_variables, self._momentums, strict=True)
            if m is not None
        )
        saved_masters = [masters or [None] * sixteen_bit, []]
        saved_generator = [generator or [None], []]
        for kept in cores:
            for kept_masters in saved_masters:
                for kept_generator in saved_generator:
                    yield kept + kept_masters + kept_generator

    def _assign_state(self, values: list[Any], source: str) -> bool:
        """Assigns `values`, saved by any configuration `_saved_layouts` knows,
        after checking every shape; converts what was saved in another dtype;
        makes masters that were not saved from their variables. False,
        assigning nothing, when no layout fits the count."""
        arrays = [np.asarray(value) for value in values]
        layouts = [layout for layout in self._saved_layouts() if len(layout) == len(arrays)]
        if not layouts:
            return False
        layout = next((x for x in layouts if _shape_mismatch(x, arrays, source) is None), None)
        if layout is None:
            raise ValueError(_shape_mismatch(layouts[0], arrays, source))
        for target, array in zip(layout, arrays, strict=True):
            if target is None:
                continue
            if isinstance(target, sharding.HostShards):
                target.assign(array)
            elif isinstance(target, (np.ndarray, host.QuantizedState)):
                host._copy_state_into(target, array)  # converting, quantising
            else:
                target.assign(array.astype(host._dtype(_dtype(target)), copy=False))
        masters = self._optional_state()[0]
        if masters and not any(x is masters[0] for x in layout):
            for master, variable in zip(self._masters, self._trainable_variables, strict=True):
                if master is not None:
                    _copy_into_master(master, variable)
        return True

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the whole state, offloaded slots included, in Keras's order."""
        return [_host_values(x, copy=True) for x in self._state()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets the whole state from `get_weights()` (of this class, with or without
        offloading, or of `keras.optimizers.AdamW`) or from another optimizer's
        `variables` list; checks every shape before assigning any.

        ``variables`` lists Keras variables only, so with state in host memory
        (``offload_state``, 8-bit state) it lacks m and v; Keras's idiom
        ``a.set_weights(b.variables)`` still carries ``b``'s whole state when
        ``b`` is one of ours: that list is recognised as ``b``'s."""
        if not self.built:  # Keras's words, which its own tests match
            raise ValueError(
                "You are calling `set_weights()` on an optimizer that has not yet been "
                "built. Please call `optimizer.build(trainable_variables)` to create the "
                "optimizer weights before calling `set_weights()`."
            )
        owner = _OWNERS.get(id(weights[0])) if len(weights) else None
        if owner is not None and owner._state_in_host_memory and _same(weights, owner.variables):
            weights = owner.get_weights()  # its variables, and its state in host memory
        if not self._assign_state(list(weights), "weights"):
            raise ValueError(
                f"set_weights got {len(weights)} arrays where this optimizer's state has "
                f"{len(self._state())} (as get_weights() returns it)"
            )

    def save_own_variables(self, store: Any) -> None:
        saved_value = backends.current().saved_value
        for i, x in enumerate(self._state()):
            store[str(i)] = saved_value(x) if isinstance(x, keras.Variable) else _host_values(x)

    def load_own_variables(self, store: Any) -> None:
        """Loads a saved state (see `_saved_layouts`). Into an optimizer not
        built yet (weights loaded into a freshly compiled model), the values
        are kept and assigned by `build`, so training resumes where it
        stopped; Keras's own optimizer skips them and starts afresh."""
        values = [np.array(store[str(i)]) for i in range(len(store.keys()))]
        if self.built or any(len(x) == len(values) for x in self._saved_layouts()):
            self._load_state(values)
        else:
            self._unbuilt_state = values

    def _load_state(self, values: list[np.ndarray]) -> None:
        if not self._assign_state(values, "the saved optimizer state"):
            warnings.warn(  # as Keras does: the optimizer starts afresh
                f"Skipping variable loading for optimizer '{self.name}', because it has "
                f"{len(self._state())} state arrays whereas the saved optimizer has "
                f"{len(values)}.",
                stacklevel=3,
            )

    # -- config -------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        if isinstance(self._weight_decay, LearningRateSchedule):
            weight_decay = keras.optimizers.schedules.serialize(self._weight_decay)
        else:
            weight_decay = float(ops.convert_to_numpy(self._weight_decay))
        config.update(
            {
                "weight_decay": weight_decay,
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "epsilon_mode": self.epsilon_mode,
                "weight_decay_mode": self.weight_decay_mode,
                "exclude_from_weight_decay": [p.pattern for p in self._exclude_patterns],
                "lr_multipliers": {p.pattern: f for p, f in self._lr_multipliers},
                "weight_decay_multipliers": {
                    p.pattern: f for p, f in self._weight_decay_multipliers
                },
                "maximize": self.maximize,
                "implementation": self.implementation,
                "offload_state": self.offload_state,
                "shard_state": self.shard_state,
                "master_weights": self.master_weights,
                "state_dtype": self.state_dtype,
                "stochastic_rounding": self.stochastic_rounding,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> AdamW:
        config = dict(config)
        if isinstance(config.get("weight_decay"), dict):
            config["weight_decay"] = keras.saving.deserialize_keras_object(
                config["weight_decay"], custom_objects=custom_objects
            )
        optimizer: AdamW = super().from_config(config, custom_objects=custom_objects)
        return optimizer


# Our optimizers by the id of their iterations variable, the first of their
# `variables` (set_weights recognises another optimizer's `variables` by it).
_OWNERS: weakref.WeakValueDictionary[int, AdamW] = weakref.WeakValueDictionary()


# -- argument checks ------------------------------------------------------------


def _checked_beta(name: str, value: Any) -> float:
    beta = _real(value)
    if beta is None or not 0 <= beta < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return beta


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _checked_learning_rate(learning_rate: Any) -> Any:
    if isinstance(learning_rate, LearningRateSchedule) or callable(learning_rate):
        return learning_rate
    value = _real(learning_rate)
    if value is None or not 0 <= value < math.inf:
        raise ValueError(
            "learning_rate must be a finite number >= 0, a LearningRateSchedule or a callable, "
            f"got {learning_rate!r}"
        )
    return value


def _checked_weight_decay(weight_decay: Any) -> float:
    if weight_decay is None:  # Keras's words, which its own tests match
        raise ValueError(
            "Argument `weight_decay` must be a float. Received: weight_decay=None "
            "(keras_adamw.AdamW also takes a LearningRateSchedule; 0 for no decay)"
        )
    value = _real(weight_decay)
    if value is None or not 0 <= value < math.inf:
        raise ValueError(
            "weight_decay must be a finite number >= 0 or a LearningRateSchedule, "
            f"got {weight_decay!r}"
        )
    return value


def _compile_patterns(name: str, patterns: Any) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        raise ValueError(f"{name} must be a list of regular expressions, not one string")
    if not isinstance(patterns, Iterable):
        raise ValueError(
            f"{name} must be a list of regular expressions, got {type(patterns).__name__}"
        )
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{name}: pattern {pattern!r} is not a string")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"{name}: pattern {pattern!r} does not compile: {error}") from None
    return compiled


def _compile_multipliers(name: str, multipliers: Any) -> list[tuple[re.Pattern[str], float]]:
    if multipliers is None:
        return []
    if not isinstance(multipliers, Mapping):
        raise ValueError(
            f"{name} must be a dict of {{pattern: factor}}, got {type(multipliers).__name__}"
        )
    compiled = []
    for pattern, factor in multipliers.items():
        value = _real(factor)
        if value is None or not 0 <= value < math.inf:
            raise ValueError(f"{name}[{pattern!r}] must be a finite number >= 0, got {factor!r}")
        compiled.append((_compile_patterns(name, [pattern])[0], value))
    return compiled


def _first_match(multipliers: list[tuple[re.Pattern[str], float]], path: str) -> float:
    return next((factor for pattern, factor in multipliers if pattern.search(path)), 1.0)


def _peak_learning_rate(learning_rate: Any) -> float | None:
    """The learning rate the decoupled decay is measured against (None: a constant one)."""
    if _real(learning_rate) is not None:
        return None
    candidates = [
        _real(getattr(learning_rate, name, None))
        for name in ("peak_value", "warmup_target", "initial_learning_rate")
    ]
    peak = next((c for c in candidates if c is not None), None)
    values = getattr(learning_rate, "values", None)
    if peak is None and isinstance(values, (list, tuple)):
        reals = [real for real in map(_real, values) if real is not None]
        if len(reals) == len(values):
            peak = max(reals)  # PiecewiseConstantDecay
    if peak is None or not peak > 0:
        raise ValueError(
            'weight_decay_mode="decoupled" scales the decay by learning_rate / its peak, but '
            f"the peak of {learning_rate!r} is not known (or not > 0): use a float or a schedule "
            "with peak_value, warmup_target or initial_learning_rate"
        )
    return float(peak)


# -- the host path ------------------------------------------------------------------


def _copy_into_master(master: Any, variable: Any) -> None:
    """``variable``'s values into its float32 master (a host array or a Keras variable)."""
    if isinstance(master, sharding.HostShards):
        master.assign(backends.current().saved_value(variable))
    elif isinstance(master, np.ndarray):
        np.copyto(master, backends.current().saved_value(variable))
    else:
        master.assign(ops.cast(variable, "float32"))


def _in_host_memory(x: Any) -> bool:
    return isinstance(x, (np.ndarray, host.QuantizedState, sharding.HostShards))


def _host_values(x: Any, copy: bool = False) -> np.ndarray:
    """The values of a piece of state as an array: a host array's own (or a
    copy), 8-bit state's decoded to float32 (lossless: they encode back to
    the same codes), a Keras variable's as NumPy holds them."""
    if isinstance(x, host.QuantizedState):
        return x.to_float()
    if isinstance(x, sharding.HostShards):
        return x.to_array()
    if isinstance(x, np.ndarray):
        return x.copy() if copy else x
    return np.array(x.numpy())


def _same(xs: Sequence[Any], ys: Sequence[Any]) -> bool:
    """Whether two lists hold the same objects (not equal values: variables compare by value)."""
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys, strict=True))


def _shape_mismatch(layout: list[Any], arrays: list[np.ndarray], source: str) -> str | None:
    """Where `arrays` do not fit `layout`'s shapes, as an error message, or None."""
    for i, (target, array) in enumerate(zip(layout, arrays, strict=True)):
        if target is not None and tuple(target.shape) != array.shape:
            name = "a slot in host memory" if _in_host_memory(target) else target.path
            return (
                f"{source}[{i}] has shape {array.shape} where this optimizer's {name} has "
                f"shape {tuple(target.shape)}: it comes from another model or configuration"
            )
    return None


def _host_unsupported_reason(var_list: list[Any], offload_state: bool) -> str | None:
    """Why the host kernel cannot update these variables, or None."""
    backend = backends.current()
    dtypes, _ = backend.host_dtypes(offload_state)
    for variable in var_list:
        path = _path(variable)
        if not isinstance(variable, keras.Variable):
            return (
                f"Keras variables ({path} is a {type(variable).__name__}: wrap it in a "
                "keras.Variable, or keep this optimizer's state in Keras variables)"
            )
        if _dtype(variable) not in dtypes:
            offloaded = " when offloaded" if offload_state else ""
            return (
                f"{' or '.join(dtypes)} variables on {keras.backend.backend()}{offloaded} "
                f"({path} is {variable.dtype})"
            )
        reason: str | None = backend.unsupported_reason(variable, offload_state)
        if reason is not None:
            return reason
    return None


def _dtype(variable: Any) -> str:
    return str(keras.backend.standardize_dtype(variable.dtype))


def _path(variable: Any) -> str:
    """A Keras variable's path; a raw backend variable's name (TF: "Variable:0")."""
    return str(getattr(variable, "path", None) or variable.name)
