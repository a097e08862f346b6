"""--resume against flags that would change what the checkpoint continues, each pair both ways: EMA on and off, a LoRA's
rank and alpha. The other side, the same value again, continues: test_train.py's and test_lora.py's resume tests (the
same loss curve as a run not stopped)."""
import pytest

import quickstart
from test_lora import base  # noqa: F401 (a fixture)
from test_train import run_args, tiny  # noqa: F401 (a fixture)


@pytest.mark.parametrize("first,then,message", [(0.9, 0, "--ema 0.0: the run in .* was trained with EMA"),
                                                (0, 0.9, "--ema 0.9: the run in .* was trained without EMA")],
                         ids=["with-then-without", "without-then-with"])
def test_resume_refuses_to_drop_or_add_the_ema(tmp_path, tiny, first, then, message):
    """A run with EMA resumed with --ema 0 would drop its average silently; one without, resumed with --ema, would start
    an average from the current weights as if it were the run's. Both are refused before anything trains."""
    quickstart.train(run_args(tmp_path, "--steps", 1, "--ema", first, "--preview-every", 0))
    with pytest.raises(ValueError, match=message + "; give its --ema again"):
        quickstart.train(run_args(tmp_path, "--steps", 2, "--ema", then, "--resume"))


@pytest.mark.parametrize("flags", [("--lora-alpha", 6), ("--lora-alpha", 1.5), ("--lora-rank", 4),
                                   ("--lora-rank", 4, "--lora-alpha", 6)], ids=["alpha-up", "alpha-down", "rank",
                                                                               "rank-same-scale"])
def test_resume_refuses_another_lora_rank_or_alpha(tmp_path, base, flags):
    """A LoRA of rank 2, alpha 3 (scale 1.5) resumed with another alpha (its scale would jump, up or down) or another
    rank (the adapters would not fit, even at the same scale alpha/rank) is refused."""
    common = ["--init", tmp_path / "base" / "model.safetensors", "--lora-rank", 2, "--lora-alpha", 3, "--lr", 1e-2,
              "--preview-every", 0]
    quickstart.train(run_args(tmp_path / "run", *common, "--steps", 1))
    with pytest.raises(ValueError, match="was trained with other LoRA settings .base .*, layers, rank or alpha"):
        quickstart.train(run_args(tmp_path / "run", *common, *flags, "--steps", 2, "--resume"))
