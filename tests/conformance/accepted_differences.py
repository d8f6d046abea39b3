"""The Keras tests that fail against keras_adamw by design, each with its
reason. Each is marked xfail(strict=True): it must still fail, so a
difference that goes away shows up at once."""

from __future__ import annotations

OURS = {"ops", "auto", "offload"}  # the layouts of ours; "keras" is Keras's own classes
EVERY = {*OURS, "keras"}

# (test, ending its node id; backends, None for all; layouts; reason)
ACCEPTED: list[tuple[str, set[str] | None, set[str], str]] = [
    (
        "OptimizerTest::test_setting_lr_to_callable_untracks_lr_var",
        None,
        OURS,
        "a float weight_decay is a variable of ours (3 variables where Keras's Adam has 2), "
        "so that assigning optimizer.weight_decay takes effect inside compiled steps",
    ),
    (
        "OptimizerTest::test_mixed_with_tf_variables",
        {"tensorflow"},
        {"offload"},
        "offloaded state is host memory kept for Keras variables: a raw tf.Variable gets a "
        "ValueError naming offload_state and the variable, before anything is built "
        "(tests/keras/test_checkpoints_and_drop_in.py)",
    ),
    *(
        (
            f"{test}::test_quantize_float8",
            {"tensorflow"},
            {"offload"},
            "the step is compiled with jit_compile=True, and XLA cannot compile our TF op; "
            "offloaded state has no Keras variables for the ops path, so a ValueError "
            "names jit_compile=False as the fix (auto and ops fall back to ops)",
        )
        for test in ("DenseTest", "EinsumDenseTest")
    ),
    (
        "SavingBattleTest::test_legacy_load_skips_missing_nested_containers",
        None,
        EVERY,
        "its fixture, saving/test_data/pre_pr22362_nested_container.keras, is not in "
        "Keras's wheel: it fails with Keras's own classes too",
    ),
]


def accepted(nodeid: str, backend: str, layout: str) -> str | None:
    """Why this test fails here by design, or None where it must pass."""
    for test, backends, layouts, reason in ACCEPTED:
        if nodeid.endswith(test) and (backends is None or backend in backends):
            if layout in layouts:
                return reason
    return None
