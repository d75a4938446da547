"""The loss history of a run's trainings, from SimpleTuner's progress lines in its logs."""

from __future__ import annotations

from sd3tune.simpletuner.history import loss_history


def _log(path, steps, total=20, loss=1.0):
    lines = [f"Epoch 1/1, Steps:  {s * 5}%| | {s}/{total} [00:01<00:01,  1.00it/s, lr=0.001, step_loss={loss + s}]"
             for s in steps]
    path.write_text("\r".join(lines) + "\n")
    return path


def test_a_later_training_supersedes_the_steps_an_earlier_one_trained_past_its_resume_point(tmp_path):
    # trained to step 8 (checkpoint at 4), interrupted; resumed from checkpoint-4 and stopped at step 6: steps 7-8
    # of the first training are not in the LoRA's history (it drew them as if they were)
    first = _log(tmp_path / "train-1.log", range(1, 9))
    second = _log(tmp_path / "train-2.log", range(5, 7), loss=10.0)
    history = loss_history([first, second])
    assert history.steps == [1, 2, 3, 4, 5, 6]
    assert history.loss == [2.0, 3.0, 4.0, 5.0, 15.0, 16.0]  # 5 and 6 from the resumed training
    assert history.logs == [str(first), str(second)]
    # a training started over from step 1 replaces all of the earlier one
    again = _log(tmp_path / "train-3.log", range(1, 3), loss=20.0)
    assert loss_history([first, second, again]).steps == [1, 2]
