"""The package's import graph (``tests/import_graph.py``) has no cycle, and the checker finds one where there is."""
import subprocess
import sys
import textwrap
from pathlib import Path

from import_graph import cycles, import_graph, package_modules

ROOT = Path(__file__).resolve().parents[1]


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert cycles(graph) == [], f"import cycles in cmpe_se_fused/ (python tests/import_graph.py): {cycles(graph)}"


def test_graph_reads_the_real_package():
    """A parser that found no imports would pass the check above: the graph must hold edges we know."""
    graph = import_graph()
    assert set(graph) == set(package_modules(ROOT / "cmpe_se_fused"))
    assert "cmpe_se_fused.convert" in graph["cmpe_se_fused"]  # from . import convert
    assert "cmpe_se_fused.modules" in graph["cmpe_se_fused.convert"]  # from .modules import CMPESE
    assert "cmpe_se_fused.vision" in graph["cmpe_se_fused.convert"]  # a function-level import
    assert "cmpe_se_fused.triton.streaming" in graph["cmpe_se_fused.bench.variants"]  # importlib.import_module


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_finds_module_level_and_function_level_cycles(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from .a import g  # postponed, still a cycle\n",
        "c.py": "from . import d\n",
        "d.py": "import pkg.c\n",
        "e.py": "from .sub.leaf import x\n",
        "sub/__init__.py": "from .. import e\n",  # e imports sub.leaf, which runs sub/__init__ first
        "sub/leaf.py": "from . import other\nfrom .. import a\n",  # its own parents: no edge to sub
        "sub/other.py": "",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.e"] == {"pkg.sub", "pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg.sub.other", "pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"], ["pkg.e", "pkg.sub"]]


def test_command_prints_the_graph_and_fails_on_a_cycle(tmp_path):
    pkg = _write(tmp_path, {"__init__.py": "", "a.py": "from . import b\n", "b.py": "from . import a\n"})
    tool = str(ROOT / "tests" / "import_graph.py")
    bad = subprocess.run([sys.executable, tool, "--root", str(pkg)], capture_output=True, text=True)
    assert bad.returncode == 1 and "cycle: pkg.a -> pkg.b -> pkg.a" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([sys.executable, tool, "--cycles"], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.strip() == "no cycle", good.stdout + good.stderr


def test_public_names_stay_where_users_import_them():
    """The layer-swapping helpers live in layer_swap.py; users import them from convert (and the sync
    layers from distributed), the same objects."""
    import cmpe_se_fused
    from cmpe_se_fused import convert, distributed, layer_swap

    for mod in (convert, distributed, cmpe_se_fused):
        missing = [name for name in mod.__all__ if not hasattr(mod, name)]
        assert not missing, f"{mod.__name__} lacks {missing}"
    for name in layer_swap.__all__:
        assert name in convert.__all__ and getattr(convert, name) is getattr(layer_swap, name)
    assert cmpe_se_fused.SyncCMPESE is distributed.SyncCMPESE


def test_import_does_not_load_triton():
    """``import cmpe_se_fused`` stays fast: the Triton backend (and Triton) load at the first Triton call."""
    code = ("import sys, cmpe_se_fused, cmpe_se_fused.ops, cmpe_se_fused.modules\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'cmpe_se_fused.triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_triton_kernels_live_in_their_subpackage():
    """The package root holds what users import; every ``@triton.jit`` kernel sits under ``cmpe_se_fused/triton/``."""
    with_kernels = [name for name, path in package_modules(ROOT / "cmpe_se_fused").items()
                    if "@triton.jit" in path.read_text()]
    assert with_kernels and all(m.startswith("cmpe_se_fused.triton.") for m in with_kernels), with_kernels
