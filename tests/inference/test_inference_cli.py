"""Every inference entry point run as `python -m lwm.<name>` (its __main__ block, through runpy): --help
prints the flags and exits 0; a bad flag or an unreadable input prints one line `lwm.<name>: error: ...`
naming the flag or file, with no traceback, and exits 2. Also: the loader's one shape function serves text
and vision, and reads back a saved checkpoint."""
import json
import pathlib

import pytest

from support import run_module

# runpy warns that the module was imported before it ran as __main__ (other tests import it): harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package")

ENTRY_POINTS = ["lwm.text_chat", "lwm.vision_chat", "lwm.vision_generation", "lwm.eval_needle",
                "lwm.eval_needle_multi"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from support import small_tokenizer

    d = tmp_path_factory.mktemp("cli")
    small_tokenizer(d)
    (d / "broken.png").write_text("not an image")
    (d / "haystack.jsonl").write_text(json.dumps({"text": "the quick brown fox."}) + "\n")
    return d


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help(name, capsys):
    code, out, _ = run_module(name, ["--help"], capsys)
    assert code == 0 and f"python -m {name}" in out and "--mesh_dim=" in out and "--load_checkpoint=" in out
    assert "--jax_distributed.coordinator_address=" in out


def _cases(d):
    tok = f"--tokenizer={d / 'tokenizer.model'}"
    hay = f"--haystack_file={d / 'haystack.jsonl'}"
    return [
        ("lwm.text_chat", ["--no_such_flag=1"], "no_such_flag"),
        ("lwm.text_chat", ["--tokenizer=/nowhere/tokenizer.model"], "/nowhere/tokenizer.model"),
        ("lwm.text_chat", ["--load_llama_config=tiny", tok, "--dtype=fp7"], "--dtype='fp7'"),
        ("lwm.text_chat", ["--load_llama_config=tiny", tok, "--mesh_dim=3,1,1,1"], "--mesh_dim='3,1,1,1'"),
        ("lwm.text_chat", ["--load_llama_config=tiny", tok, "--update_llama_config=__import__('os')"],
         "update_llama_config"),
        ("lwm.text_chat", ["--load_llama_config=tiny", tok, "--load_checkpoint=params::/nowhere/params"],
         "/nowhere/params"),
        ("lwm.text_chat", ["--load_llama_config=tiny", tok], "--load_checkpoint is empty"),
        ("lwm.vision_chat", ["--prompt=hi", "--input_file=/nowhere/x.png", "--load_llama_config=tiny",
                             "--vqgan_config=tiny", tok], "/nowhere/x.png"),
        ("lwm.vision_chat", ["--prompt=hi", f"--input_file={d / 'broken.png'}", "--load_llama_config=tiny",
                             "--vqgan_config=tiny", tok], "broken.png: cannot read as an image"),
        ("lwm.vision_chat", ["--prompt=hi"], "--input_file is required"),
        ("lwm.vision_generation", ["--output_file=x.gif"], "--output_file=x.gif"),
        ("lwm.vision_generation", ["--output_file=x.png", "--vqgan_config=nope"], "nope"),
        ("lwm.eval_needle", ["--haystack_file=/nowhere/h.jsonl"], "--haystack_file=/nowhere/h.jsonl"),
        ("lwm.eval_needle", [hay, "--n_rounds=0"], "--n_rounds=0"),
        ("lwm.eval_needle_multi", [hay, "--n_needles_total=2", "--n_needles_retrieve=3"], "n_needles_retrieve=3"),
    ]


# _cases reads only the folder's path, so the count is taken at collection from a placeholder: every case
# in the list runs (a fixed range(15) silently dropped a 16th).
@pytest.mark.parametrize("case", range(len(_cases(pathlib.Path("files")))))
def test_bad_input_is_one_line(case, files, capsys):
    name, argv, needle = _cases(files)[case]
    code, _, err = run_module(name, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_one_shape_function_for_text_and_vision():
    import jax.numpy as jnp

    from lwm.inference.loader import load_model
    from lwm.model.shapes import param_shapes
    from lwm.model.llama import LLaMAConfig
    from lwm.model.vision_llama import VisionLLaMAConfig

    text = param_shapes(LLaMAConfig.load("tiny"))
    vision = param_shapes(VisionLLaMAConfig.load("tiny"))
    assert "lm_head" in text and "vision_head" in vision and "vision_head" not in text
    ring = param_shapes(LLaMAConfig.load("tiny").replace(attention_impl="ring"))
    assert jax_tree_shapes(ring) == jax_tree_shapes(text)          # the attention path does not matter
    assert jax_tree_shapes(param_shapes(LLaMAConfig.load("tiny"), jnp.bfloat16)) != jax_tree_shapes(text)
    with pytest.raises(ValueError, match="--load_checkpoint is empty"):
        load_model(LLaMAConfig.load("tiny"), "", jnp.float32)


def jax_tree_shapes(tree):
    import jax

    return [(jax.tree_util.keystr(p), x.shape, str(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_loader_reads_a_checkpoint_onto_the_mesh(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lwm.checkpoint.formats import save_streaming
    from lwm.inference.loader import load_model
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.parallel.sharding import make_mesh

    config = LLaMAConfig.load("tiny")
    params = LLaMAForCausalLM(config).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
    save_streaming(str(tmp_path / "params"), params)
    mesh = make_mesh("1,-1,1,1")
    with jax.set_mesh(mesh):
        _, got = load_model(config, f"params::{tmp_path / 'params'}", jnp.bfloat16, mesh)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(got)):
        assert b.dtype == jnp.bfloat16 and b.sharding.mesh.shape == mesh.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(b.astype(jnp.float32)),
                                      np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)))
    assert any(len(set(b.sharding.device_set)) == 8 and not b.sharding.is_fully_replicated
               for b in jax.tree.leaves(got))                       # placed by the table, not replicated
