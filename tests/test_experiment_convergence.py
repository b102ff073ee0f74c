"""``normkit experiment convergence``: each arm at its validation-chosen learning rate, compared on test."""

from normkit.experiments.convergence import ARMS, compare


def test_each_arm_is_tuned_on_validation_and_compared_with_intervals(quick_experiment):
    result = quick_experiment("convergence")
    for arm in ARMS:
        chosen = result["per_arm_lr"][arm]
        assert chosen["value"] in result["config"]["lrs"] and "validation" in chosen["criterion"]
        assert result["per_seed"][arm] == result["runs"][arm][chosen["index"]]
        assert all(run["lr"] == chosen["value"] and run["val_curve"] for run in result["per_seed"][arm])
    assert "ci95" in result["tuned"]["ratio"] and "ci95" in result["tuned"]["accuracy_gain"]
    assert result["validation"]["examples"] > 0


def _run(steps_to_90, final):
    return {"curve": [[0, 0.1], [steps_to_90, 0.91], [1000, final]], "final_accuracy": final}


def test_compare_counts_a_plain_arm_that_never_arrives_as_the_whole_budget():
    config = {"target": 0.9, "steps": 1000}
    never = {"curve": [[0, 0.1], [1000, 0.8]], "final_accuracy": 0.8}
    result = compare([never, _run(300, 0.95), _run(400, 0.96)], [_run(100, 0.98), _run(100, 0.97), _run(200, 0.98)],
                     config)
    assert result["ratio"]["lower_bound"] and abs(result["ratio"]["values"][0] - 10.0) < 1e-9
    assert result["accuracy_gain"]["n"] == 3 and result["accuracy_gain"]["mean"] > 0
