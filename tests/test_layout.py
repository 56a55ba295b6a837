"""The package layout: imports only point down the layers of docs/ARCHITECTURE.md, and the config is data."""
import ast
import re
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "synood_jax"

# Layer of each sub-package (top-level modules are layer 0). A module may import its own package, or a
# package of a lower layer; never one of the same layer or above.
LAYERS = {"": 0, "models": 1, "data": 1, "diffusion": 2, "demo": 2, "labels": 2,
          "ood": 3, "synthesis": 3, "train": 3, "pipeline": 4, "testing": 5}


def _package(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 else ""   # synood_jax.<pkg>.<mod>, or synood_jax.<mod>


def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("synood_jax"):
      for alias in node.names:  # `from synood_jax.models import clip` names the module synood_jax.models.clip
        full = f"{node.module}.{alias.name}"
        out.add(full if (ROOT.parent / (full.replace(".", "/") + ".py")).exists() else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("synood_jax"))
  return out


def test_every_sub_package_has_a_layer():
  packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
  assert packages == set(LAYERS) - {""}


def test_imports_only_point_down():
  bad = []
  for path in sorted(ROOT.rglob("*.py")):
    me = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    mine = _package(me)
    for target in _imports(path):
      theirs = _package(target) if target.count(".") >= 2 else ("" if target.count(".") == 1 else mine)
      if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
        bad.append(f"{me} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})")
  assert not bad, "\n".join(bad)


def test_reading_a_config_loads_no_jax():
  code = ("import sys; sys.path.insert(0, 'configs'); import importlib;"
          "c = importlib.import_module('imagenet_vitb16').get_config(); d = importlib.import_module('demo').get_config();"
          "heavy = [m for m in ('jax', 'flax', 'optax', 'orbax', 'torch') if m in sys.modules];"
          "print(heavy); assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, check=True)


def _picture() -> dict[str, set[str]]:
  """{package ('' for layer 0): the words of its group} from docs/ARCHITECTURE.md's layer picture."""
  doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
  block = doc.split("```\nlayer ", 1)[1].split("```", 1)[0]
  groups, current = {}, None
  for line in ("layer " + block).splitlines():
    found = re.search(r"\b([a-z_]+)/\s", line)
    if found and found.group(1) in LAYERS:
      current = found.group(1)
    elif "layer 0" in line:
      current = ""
    elif not line.startswith(" " * 10):
      continue
    groups.setdefault(current, set()).update(re.findall(r"[A-Za-z_]+(?:\.py)?", line))
  return groups


def test_every_module_is_named_in_the_architecture_document():
  groups = _picture()
  missing = []
  for path in sorted(ROOT.rglob("*.py")):
    if path.name == "__init__.py":
      continue
    pkg = path.parent.name if path.parent != ROOT else ""
    want = path.name if pkg == "" else path.stem
    if want not in groups.get(pkg, set()):
      missing.append(str(path.relative_to(ROOT)))
  assert not missing, f"docs/ARCHITECTURE.md's layer picture does not name: {missing}"


def test_no_module_is_over_400_lines():
  long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
  assert not long, long
