"""One-way dependencies: the model files import no file I/O and no CLI; the product never imports the demos."""
import os

REPO = os.path.join(os.path.dirname(__file__), "..")


def imports(name):
    """The top-level names a file of the repository imports, anywhere in it (inside functions too)."""
    import ast
    tree = ast.parse(open(os.path.join(REPO, name + ".py")).read())
    return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}


def test_the_product_never_imports_the_demo():
    """The quick start and the weak-to-strong experiment use the product; no product file imports either (and the
    quick start does not import the experiment built on it)."""
    import glob
    demos = {"quickstart", "weak_to_strong"}
    product = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "*.py"))} - demos
    assert {"sample", "train", "hub", "weights", "sigma", "diffusion", "vae", "t5", "sizes", "data", "came", "cli"} <= product
    for name in product:
        assert not imports(name) & demos, f"{name}.py imports {imports(name) & demos}"
    assert "weak_to_strong" not in imports("quickstart")


def test_the_model_files_import_no_file_io_and_no_cli():
    """The dependency runs CLIs -> weights.py / hub.py -> models: a model file reads no file and parses no flag."""
    for name in ("sigma", "t5", "vae", "diffusion"):
        found = imports(name) & {"weights", "hub", "cli", "sample", "train", "export", "lora", "data", "quickstart",
                                 "weak_to_strong", "safetensors", "huggingface_hub"}
        assert not found, f"{name}.py imports {sorted(found)}"
