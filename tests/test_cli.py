"""Bad input, for both CLIs (sample.py; train.py and quickstart.py train/score): every mistake exits non-zero with
one line naming the flag or file, before anything is built, downloaded or trained, and never with a traceback.

The main() functions run in-process, with the heavy and networked functions replaced by ones that raise `Reached`
(a BaseException: no `except Exception` of the product can swallow it), so a check that came too late, or a
network call, fails its row; one subprocess row per CLI proves the real exit code."""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoints
import cli
import diffusion
import hub
import quickstart
import sample
import sigma
import sizes
import train
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Reached(BaseException):
    """Heavy work or the network was reached."""


def refuse(what):
    def fn(*args, **kwargs):
        raise Reached(what)
    return fn


@pytest.fixture(autouse=True)
def nothing_heavy(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hf_hub_download", refuse("a download"))
    monkeypatch.setattr(hub, "get_hf_file_metadata", refuse("a network request"))
    monkeypatch.setattr(sigma.PixArtSigma, "__init__", refuse("a DiT built"))
    monkeypatch.setattr(weights, "load_t5", refuse("T5 loaded"))
    monkeypatch.setattr(weights, "load_vae", refuse("a VAE loaded"))
    monkeypatch.setattr(quickstart, "components", refuse("the quick-start T5 written"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Local paths the rows use: a real quick-start run (tiny DiT, the quick start's T5, tokenizer and pixel space), a run with no
    checkpoint yet, and files that are not what they are passed as."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    comps = quickstart.components(str(run))
    config = sigma.SigmaConfig(**{**quickstart.DIT, "depth": 1, "hidden_size": 32, "num_heads": 2})
    os.makedirs(run / "step_0000005")
    weights.save_checkpoint(sigma.PixArtSigma(config), str(run / "step_0000005" / "model.safetensors"))
    (run / "latest").write_text("step_0000005")
    checkpoints.save_run_settings(str(run), comps, 4.0)
    (root / "fresh").mkdir()
    (root / "fresh" / "log.jsonl").write_text("")  # a run that has not saved yet
    (root / "empty").mkdir()
    (root / "text.txt").write_text("hello")
    (root / "zip.pth").write_bytes(b"PK\x03\x04 not really a zip archive")
    (root / "text.safetensors").write_text("hello")
    save_file({"weight": torch.zeros(2)}, str(root / "vae.safetensors"))
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "blank.txt").write_text("\n\n")
    (root / "stale").mkdir()
    (root / "stale" / "latest").write_text("step_0000009")
    (root / "moved").mkdir()
    (root / "moved" / "step_0000001").mkdir()
    shutil.copy(run / "step_0000005" / "model.safetensors", root / "moved" / "step_0000001" / "model.safetensors")
    (root / "moved" / "latest").write_text("step_0000001")
    json.dump(dict(text_encoder="/gone/text_encoder", tokenizer="/gone/spiece.model", vae="/gone/vae", clip_x0=4.0),
              open(root / "moved" / "sample.json", "w"))
    (root / "badjson" / "step_0000001").mkdir(parents=True)
    shutil.copy(run / "step_0000005" / "model.safetensors", root / "badjson" / "step_0000001" / "model.safetensors")
    (root / "badjson" / "latest").write_text("step_0000001")
    (root / "badjson" / "sample.json").write_text("{not json")
    (root / "broken" / "step_0000001").mkdir(parents=True)
    (root / "broken" / "step_0000001" / "model.safetensors").write_text("cut short")
    (root / "broken" / "latest").write_text("step_0000001")
    (root / "halfcomps" / "text_encoder").mkdir(parents=True)
    images = root / "images"
    images.mkdir()
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(images / f"{i}.png")
    (images / "0.txt").write_text("a dark red square")
    (images / "1.txt").write_text("a red square")
    (root / "uncaptioned").mkdir()
    Image.new("RGB", (32, 32)).save(root / "uncaptioned" / "cat.png")
    (root / "bad.jsonl").write_text('{"image": "0.png", "caption": "x"}\nnot json\n')
    (root / "list.jsonl").write_text('["0.png", "x"]\n')
    done = root / "done"
    os.makedirs(done / "step_0000005")
    (done / "latest").write_text("step_0000005")
    return root


def one_line(capsys, rc):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), err
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


SAMPLE_ROWS = [  # (argv with {root} for the files fixture, what the line must say)
    (["a cat", "--model", "{root}/text.txt"], "--model {root}/text.txt is not a checkpoint"),
    (["a cat", "--model", "{root}/empty"], "--model {root}/empty is an empty folder"),
    (["a cat", "--model", "{root}/fresh"], "--model {root}/fresh is a train.py run with no checkpoint yet"),
    (["a cat", "--model", "{root}/stale"], "its 'latest' names step_0000009, which is missing"),
    (["a cat", "--model", "{root}/zip.pth"], "could not read {root}/zip.pth as a torch checkpoint (RuntimeError"),
    (["a cat", "--model", "{root}/text.safetensors"], "--model {root}/text.safetensors: not a readable .safetensors"),
    (["a cat", "--model", "{root}/vae.safetensors"], "this .safetensors file holds no PixArt DiT"),
    (["a cat", "--model", "{root}/moved"], "the text_encoder named in {root}/moved/sample.json is missing"),
    (["a cat", "--model", "{root}/badjson"], "{root}/badjson/sample.json is not valid JSON"),
    (["a cat", "--model", "3000"], "--model '3000' is neither a released model (256, 512, 1024, 2K)"),
    (["a cat", "--model", "1024"], "--model: cannot get transformer/config.json of https://huggingface.co/PixArt-alpha/"
                                   "PixArt-Sigma-XL-2-1024-MS: HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"),
    (["a cat", "--device", "gpu"], "--device gpu: not a device name"),
    (["a cat", "--device", "cuda:99"], "--device cuda:99: not available here"),
    (["a cat", "--prompts-file", "{root}/missing.txt"], "--prompts-file {root}/missing.txt: cannot read it (No such file"),
    (["a cat", "--prompts-file", "{root}"], "--prompts-file {root}: cannot read it (Is a directory"),
    (["a cat", "--prompts-file", "{root}/latin1.txt"], "--prompts-file {root}/latin1.txt: cannot read it"),
    (["--prompts-file", "{root}/blank.txt"], "--prompts-file {root}/blank.txt holds no prompt"),
    ([], "no prompt: give one (quoted) or --prompts-file"),
    (["a cat", "--steps", "0"], "--steps 0: must be from 1 to 1000"),
    (["a cat", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["a cat", "--cfg", "nan"], "--cfg nan: must be >= 1"),
    (["a cat", "--cfg", "0.5"], "--cfg 0.5: must be >= 1 (1 = no guidance"),
    (["a cat", "--cfg", "1", "--negative", "blurry"], "--negative has no effect with --cfg 1"),
    (["a cat", "--n", "0"], "--n 0: must be >= 1"),
    (["a cat", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["a cat", "--dtype", "fp8"], "--dtype 'fp8' is unknown: use one of auto, fp32, float32, bf16, bfloat16, fp16, float16, half"),
    (["a cat", "--size", "1000x1001"], "--size must be a multiple of 8 on both sides (the VAE"),
    (["a cat", "--size", "9000"], "--size 9000x9000 is out of range"),
    (["a cat", "--size", "big"], "--size must be 1024, 2048, 4096, 1K, 2K, 4K (square) or WxH"),
    (["a cat", "--model", "{root}/run", "--size", "8"], "--size 8x8 is out of range: sides from 16 px"),
    (["a cat", "--kv-compress", "maxpool"], "--kv-compress mode must be conv, uniform or avgpool"),
    (["a cat", "--kv-compress", "conv:30"], "--kv-compress conv:30: the model has blocks 0-27, not 30"),
    (["a cat", "--components", "./missing"], "--components ./missing: no such folder"),
    (["a cat", "--components", "{root}/halfcomps"], "--components {root}/halfcomps: no tokenizer at"),
    (["a cat", "--out", "{root}/text.txt"], "--out {root}/text.txt is a file"),
]


@pytest.mark.parametrize("argv,message", SAMPLE_ROWS, ids=[" ".join(a) for a, _ in SAMPLE_ROWS])
def test_sample_py_rows(argv, message, files, capsys):
    try:
        rc = sample.main([a.format(root=files) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert message.format(root=files) in one_line(capsys, rc)


def test_sample_py_fails_fast_without_network(files, capsys, monkeypatch):
    """Online but unreachable: one short request, then the message (huggingface_hub would retry ~25 s first)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(url, timeout, retry_on_errors):
        assert timeout <= 10 and not retry_on_errors
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(hub, "get_hf_file_metadata", unreachable)
    line = one_line(capsys, sample.main(["a cat", "--model", "1024"]))
    assert "--model: cannot get transformer/config.json" in line and "Name or service not known" in line


def test_sample_py_pixel_space_sizes_pass_the_checks(files, capsys):
    """A run whose VAE has one pixel per latent (the quick start's pixel space) takes any side from 16 px (no multiple
    of 8, the SDXL VAE's): the checks pass and the DiT loads."""
    with pytest.raises(Reached, match="a DiT built"):
        sample.main(["a cat", "--model", str(files / "run"), "--size", "20x18"])


def test_sample_py_warns_of_unknown_words(files, capsys, monkeypatch):
    monkeypatch.undo()  # a real (tiny) run, sampled for one step
    rc = sample.main(["a purple hexagon on a red background", "a red circle on a blue background", "--model",
                      str(files / "run"), "--steps", "1", "--seed", "0", "--out", str(files / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert rc == 0 and len(err) == 1
    assert "'purple', 'hexagon'" in err[0] and "a purple hexagon" in err[0] and "<unk>" in err[0]


SIZE_ROWS = [  # (--size for the fixture's run: 16 px, 2-px patches, 64 tokens; what sample.py says first, or None)
    ("16", None),
    ("17x20", "sample.py: --size 17x20 is sampled at 18x20 (sides rounded up to whole 2-px patches; the image is "
              "resized back): 90 tokens, 1.41x the 64 of its training size 16²: the DiT runs on a larger grid through "
              "position-embedding interpolation; estimated "),
    ("24", "sample.py: --size 24x24: 144 tokens, 2.25x the 64 of its training size 16²: the DiT runs on a larger grid"),
    ("40x48", "sample.py: --size 40x48: 480 tokens, 7.5x the 64 of its training size 16²: the DiT runs on a larger grid "
              "through position-embedding interpolation, far from what it was trained at: expect a poor image; estimated"),
]


@pytest.mark.parametrize("size,message", SIZE_ROWS, ids=[s for s, _ in SIZE_ROWS])
def test_sample_py_says_what_a_size_costs(size, message, files, capsys, monkeypatch):
    """Before sampling: the rounding of a size, its tokens against the training size's, the estimated memory and time;
    then the image is sampled at the size asked for."""
    monkeypatch.undo()  # a real (tiny) run, sampled for one step
    out = files / f"size{size}"
    assert sample.main(["a red circle", "--model", str(files / "run"), "--size", size, "--steps", "1", "--seed", "0",
                        "--out", str(out)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample.py:")]
    assert said == [] if message is None else len(said) == 1 and said[0].startswith(message), said
    if message:
        assert " GiB of activations (" in said[0] and " GiB free), at least " in said[0] and said[0].endswith(" for 1 step")
    w, h = map(int, (size + "x" + size).split("x")[:2])
    assert Image.open(out / "00000-0.png").size == (w, h)


@pytest.mark.parametrize("force", [False, True])
def test_sample_py_refuses_a_size_that_cannot_fit(force, files, capsys, monkeypatch):
    """1 MiB free and a size whose activations take 4 MiB: refused in one line naming the largest size that fits
    (before anything is sampled), or with --force-size, said and sampled."""
    monkeypatch.undo()
    monkeypatch.setattr(sizes, "free_memory", lambda device: 2**20)
    if not force:
        monkeypatch.setattr(diffusion, "sample", refuse("sampling"))
    out = files / f"forced{force}"
    argv = ["a red circle", "--model", str(files / "run"), "--size", "64", "--steps", "1", "--seed", "0", "--out", str(out)]
    rc = sample.main(argv + ["--force-size"] * force)
    if force:
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample.py:")]
        assert rc == 0 and len(said) == 1 and said[0].endswith(": it may not fit (the largest size of this shape that fits in memory and "
                                                               "in an hour is about 32x32); sampling anyway (--force-size)"), said
        assert Image.open(out / "00000-0.png").size == (64, 64)
    else:
        line = one_line(capsys, rc)
        assert rc == 2 and line.startswith("sample.py: error: --size 64x64: 1,024 tokens, 16x the 64 of its training size")
        assert "estimated 0.00391 GiB of activations (0.000977 GiB free), at least " in line
        assert ("it would not fit; the largest size of this shape that fits in memory and in an hour is about 32x32 "
                "(--force-size to try anyway)") in line
        assert not out.exists()


def test_ctrl_c_stops_sampling_at_once(files):
    """Ctrl-C inside one long operation (self-attention over 262,144 tokens, minutes; --force-size: on a slow CPU the
    estimate may pass the hour): one line, exit 130, at once."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "a red circle", "--model", str(files / "run"),
                          "--size", "1024", "--steps", "1", "--force-size", "--out", str(files / "interrupted")],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        warning = p.stderr.readline()  # said before sampling starts
        assert warning.startswith("sample.py: --size 1024x1024: 262,144 tokens"), warning
        time.sleep(1.5)  # in the first DiT forward by now
        start = time.time()
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=15)[1]
        assert p.returncode == 130 and time.time() - start < 5, (p.returncode, rest)
        lines = [line for line in rest.replace("\r", "\n").splitlines() if line.strip() and "dpm-solver++" not in line]
        assert lines == ["sample.py: interrupted (Ctrl-C)"], rest
    finally:
        p.kill()


def run_train(capsys, argv, quick=False):
    """train.py's or quickstart.py's __main__, in-process: main(), its error turned into the exit status."""
    try:
        quickstart.main(["train", *argv]) if quick else train.main(cli.parse_train_args(argv))
        return 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1


TRAIN_ROWS = [  # (argv, run by quickstart.py train?, what the line must say); {root}: the files fixture
    ([], False, "--data is required"),
    (["--batch-size", "0"], False, "--batch-size 0: must be >= 1"),
    (["--batch-size", "-1"], False, "--batch-size -1: must be >= 1"),
    (["--batch-size", "3"], False, "no bucket holds a global batch of 3 images (largest has 2): lower --batch-size"),
    (["--save-every", "0"], False, "--save-every 0: must be >= 1"),
    (["--steps", "0"], False, "--steps 0: must be >= 1"),
    (["--log-every", "0"], False, "--log-every 0: must be >= 1"),
    (["--grad-accum", "0"], False, "--grad-accum 0: must be >= 1"),
    (["--workers", "-1"], False, "--workers -1: must be >= 0"),
    (["--lr", "0"], False, "--lr 0.0: must be > 0"),
    (["--caption-dropout", "1.5"], False, "--caption-dropout 1.5: must be in [0, 1]"),
    (["--ema", "1"], False, "--ema 1.0: must be in [0, 1)"),
    (["--clip", "nan"], False, "--clip nan: must be > 0"),
    (["--init", "{root}/missing.pth"], False, "--init '{root}/missing.pth' is neither a released model"),
    (["--init", "{root}/text.txt"], False, "--init {root}/text.txt is not a checkpoint"),
    (["--init", "{root}/empty"], False, "--init {root}/empty is an empty folder"),
    (["--data", "{root}/missing"], False, "--data {root}/missing does not exist"),
    (["--data", "{root}/empty"], False, "--data {root}/empty: no images"),
    (["--data", "{root}/uncaptioned"], False, "--data {root}/uncaptioned: none of its 1 images has a caption"),
    (["--data", "{root}/bad.jsonl"], False, "--data {root}/bad.jsonl line 2: not JSON"),
    (["--data", "{root}/list.jsonl"], False, "{root}/list.jsonl line 1: needs 'image' and caption keys"),
    (["--caption-keys", "caption:x"], False, "--caption-keys 'caption:x': give KEY or KEY:WEIGHT"),
    (["--caption-keys", "caption,vlm"], False, "--caption-keys: several keys need a .jsonl --data manifest"),
    (["--kv-compress-layers", "deep-half"], False, "--kv-compress-layers 'deep-half': give 'deep'"),
    (["--kv-compress-ratio", "4"], False, "--kv-compress-ratio needs --kv-compress-layers"),
    (["--preview-prompts", "a cat"], False, "--preview-prompts needs --preview-every N"),
    (["--preview-every", "300", "--save-every", "200"], False, "--preview-every 300: previews are drawn at checkpoints"),
    (["--image-size", "1000"], False, "--image-size 1000: must be a multiple of 16"),
    (["--image-size", "768"], False, "--image-size 768: no official bucket table"),
    (["--clip-x0", "0"], False, "--clip-x0 0.0: must be > 0"),
    (["--config", "512", "--init", "1024"], False, "--config applies to --init scratch only"),
    (["--config", "4K"], False, "argument --config: invalid choice: '4K'"),
    (["--components", "./missing"], False, "--components ./missing: no such folder"),
    (["--vae", "{root}/missing"], False, "--vae {root}/missing does not exist"),
    (["--out", "{root}/text.txt"], False, "--out {root}/text.txt is a file"),
    (["--cache", "{root}/text.txt"], False, "--cache {root}/text.txt is a file"),
    (["--device", "gpu"], False, "--device gpu: not a device name"),
    (["--init", "1024", "--batch-size", "2"], False, "--init: cannot get transformer/config.json"),
    (["--data", "x"], True, "--data: this entry point trains on its own dataset"),
    (["--cache", "x"], True, "--cache builds from --data's images"),
    (["--components", "{root}"], True, "--components is set by this entry point"),
    (["--batch-size", "0"], True, "--batch-size 0: must be >= 1"),
    (["--out", "{root}/done", "--resume", "--steps", "5"], True, "--steps 5: the run in {root}/done is already at step 5"),
    (["--out", "{root}/run", "--resume", "--steps", "9", "--image-size", "32"], True,
     "--image-size 32: the run in {root}/run has 16, and --resume continues its model as it is"),
    (["--out", "{root}/run", "--resume", "--steps", "9", "--caption-tokens", "8"], True, "--caption-tokens 8: the run in"),
    (["--out", "{root}/run", "--resume", "--steps", "9", "--kv-compress-layers", "0"], True, "--kv-compress-layers [0]: the run"),
    (["--out", "{root}/run", "--resume", "--steps", "9", "--ema", "0.9"], True, "--ema 0.9: the run in {root}/run was "
                                                                                "trained without EMA"),
    (["--out", "{root}/broken", "--resume", "--steps", "9"], True, "--resume: cannot read the config of {root}/broken"),
    (["--out", "{root}/done", "--steps", "9"], True, "{root}/done already holds a run (latest: step_0000005): add --resume"),
]


@pytest.mark.parametrize("argv,quick,message", TRAIN_ROWS, ids=[" ".join(a) + " qs" * q for a, q, _ in TRAIN_ROWS])
def test_train_py_rows(argv, quick, message, files, capsys, tmp_path):
    argv = [a.format(root=files) for a in argv]
    if not quick and "--data" not in argv and argv:
        argv = ["--data", str(files / "images"), "--image-size", "256", *argv]
    if "--out" not in argv and argv:
        argv = ["--out", str(tmp_path / "run"), *argv]
    rc = run_train(capsys, argv, quick)
    assert message.format(root=files) in one_line(capsys, rc)


@pytest.mark.parametrize("argv,message", [
    ([], "quickstart.py: error: no command: give one of train, score"),
    (["trian"], "quickstart.py: error: unknown command 'trian': give one of train, score"),
    (["score", "{root}/missing"], "quickstart.py: error: no such run '{root}/missing'"),
    (["score", "{root}/fresh"], "quickstart.py score {root}/fresh is a train.py run with no checkpoint yet"),
    (["score", "{root}/run", "--n", "0"], "need --n >= 1"),
    (["score", "{root}/run", "--steps", "0"], "1 <= --steps <= 1000"),
    (["score", "{root}/run", "--sed", "3"], "quickstart.py score: error: unrecognized arguments: --sed 3"),
])
def test_quickstart_rows(argv, message, files, capsys, monkeypatch):
    """quickstart.py's __main__, in-process: one line on stderr, exit status 2 as sample.py's."""
    monkeypatch.setattr(sys, "argv", ["quickstart.py", *[a.format(root=files) for a in argv]])
    monkeypatch.setattr(cli, "stop_on_interrupt", lambda prog: None)  # not in pytest's own process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # pick_threads leaves the threads alone
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "quickstart.py"), run_name="__main__")
    assert e.value.code == 2 and message.format(root=files) in one_line(capsys, e.value.code)


def test_train_py_skips_and_reports_images_without_captions(files, capsys):
    """2 of 3 images have captions: the third is skipped, said and counted; then training starts (the model build)."""
    with pytest.raises(Reached, match="a DiT built"):
        train.main(cli.parse_train_args(["--data", str(files / "images"), "--image-size", "256", "--batch-size", "2",
                                         "--out", str(files / "o")]))
    out = capsys.readouterr().out
    assert "data: skipping 1 of 3 images without a caption (no or an empty same-name .txt): 2.png" in out
    assert f"run folder {files / 'o'}" in out  # where the run goes, before the work starts


@pytest.mark.parametrize("cli,argv,rc", [
    ("sample.py", ["a cat", "--steps", "0"], 2),
    ("train.py", ["--data", "{root}/uncaptioned"], 1),
    ("quickstart.py", ["train", "--data", "x"], 2),
    ("quickstart.py", ["trian"], 2),
    ("weak_to_strong.py", ["--fsat"], 2),
])
def test_exit_status_in_a_real_process(cli, argv, rc, files):
    done = subprocess.run([sys.executable, os.path.join(ROOT, cli), *[a.format(root=files) for a in argv]],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == rc and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "error: " in done.stderr, done.stderr


def test_help_reads_right(capsys):
    """No '(default: None)' after a help text that says its default, no '(default: True)' after an off switch."""
    for main in (sample.main, cli.parse_train_args):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
        assert "(default: 20)" in text or "(default: 1000)" in text  # set defaults are still shown
