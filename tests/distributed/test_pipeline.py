"""Pipeline parallel on the CPU backend: P ranks train exactly like one process.

The reference is the ordinary Trainer on one process with the same global
batch as gradient accumulation (batch_size b, grad_accum M); the pipeline runs
the same M micro-batches through P stages. Only the order of a few float32
additions differs (the tied embedding's gradient is summed as embedding part
+ head part over the step, not micro-batch by micro-batch; the norm's partial
sums), so: the 20 losses, gradient norms and validation losses agree to 1e-6
relative, and the parameters after 20 steps to 1e-5 of each tensor's largest
entry (AdamW divides by sqrt(v), so last-bit differences in a gradient grow
over 20 steps at lr 1e-2; measured: <= 2.3e-6).

The model has no biases: the key projection's bias has an exactly zero
gradient (softmax ignores a constant added to every score of a row), so its
AdamW update is m / sqrt(v) of pure rounding noise, different for any other
order of additions: it cannot be compared.
"""

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_config, make_dataset, make_model  # noqa: E402

import minillm as mm  # noqa: E402
from minillm import backend  # noqa: E402
from minillm.distributed.pipeline import PipelineStage, build_stage, partition, stage_bounds  # noqa: E402
from minillm.distributed.pipeline_trainer import PipelineTrainer  # noqa: E402
from minillm.distributed.spawn import spawn  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.nn import layers  # noqa: E402
from minillm.train import Trainer  # noqa: E402
from minillm.train.checkpoint import load_checkpoint  # noqa: E402

LAYERS = 4
RUN = dict(steps=20, batch_size=2, grad_accum=4, clip=0.5, eval_interval=10, eval_batches=2, checkpoint_interval=10)


def _model():
    return make_model(n_layer=LAYERS, bias=False)   # seed 0


CONFIG = _model().config


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return ([r["loss"] for r in records if r["kind"] == "train"], [r["grad_norm"] for r in records if r["kind"] == "train"],
            [r["val_loss"] for r in records if r["kind"] == "eval"])


def _single(run_dir, stop_at=None, resume=False, **overrides):
    trainer = Trainer(_model(), make_config(**{**RUN, **overrides}), make_dataset(), run_dir=run_dir)
    if resume:
        trainer.resume()
    trainer.fit(stop_at=stop_at)
    return {n: p.data.copy() for n, p in trainer.model.named_parameters()}


def _pipeline_rank(group, run_dir, schedule, stop_at, resume, overrides):
    mm.manual_seed(0)                                    # _model()'s seed: only this stage is built
    stage = build_stage(CONFIG, group.rank, group.world_size)
    trainer = PipelineTrainer(stage, make_config(**{**RUN, **overrides}), make_dataset(), group.comm, schedule,
                              run_dir=run_dir)
    if resume:
        trainer.resume()
    trainer.fit(stop_at=stop_at)
    return {n: p.data.copy() for n, p in stage.named_parameters()}, trainer.engine.max_in_flight


def _pipeline(run_dir, stages, schedule="1f1b", stop_at=None, resume=False, **overrides):
    results = spawn(_pipeline_rank, stages, args=(run_dir, schedule, stop_at, resume, overrides))
    params = {}
    for stage_params, _ in results:
        params.update(stage_params)
    return params, [in_flight for _, in_flight in results]


def _assert_close(actual, expected, rtol=1e-6, each=False):
    """each: every entry within rtol (losses). Else the largest difference within rtol of the largest entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    if each:
        assert np.max(np.abs(actual - expected) / np.abs(expected)) <= rtol
    else:
        assert np.max(np.abs(actual - expected)) <= rtol * np.max(np.abs(expected))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return _single(run_dir), _losses(run_dir), run_dir


@pytest.mark.parametrize("stages, schedule", [(2, "gpipe"), (2, "1f1b"), (4, "1f1b"), (4, "gpipe")])
def test_pipeline_trains_like_one_process(reference, tmp_path, stages, schedule):
    ref_params, (ref_losses, ref_norms, ref_val), _ = reference
    params, in_flight = _pipeline(tmp_path, stages, schedule)
    losses, norms, val = _losses(tmp_path)
    assert len(losses) == 20 and len(val) == 2
    _assert_close(losses, ref_losses, each=True)
    _assert_close(norms, ref_norms, each=True)     # clipping (at 0.5) was active: the global norm is right
    _assert_close(val, ref_val, each=True)
    assert set(params) == set(ref_params)
    for name in ref_params:
        _assert_close(params[name], ref_params[name], rtol=1e-5)
    M = RUN["grad_accum"]
    # GPipe holds all M micro-batches' activations; 1F1B at most P - s on stage s
    assert in_flight == ([M] * stages if schedule == "gpipe" else [min(M, stages - s) for s in range(stages)])


def test_checkpoint_is_one_ordinary_file(reference, tmp_path):
    ref_params, _, ref_dir = reference
    _pipeline(tmp_path, 2)
    saved, ref_saved = load_checkpoint(tmp_path), load_checkpoint(ref_dir)
    assert list(saved.model_state) == list(ref_saved.model_state)   # same names, same order
    for name, array in ref_saved.model_state.items():
        _assert_close(saved.model_state[name], array, rtol=1e-5)
    assert saved.optimizer_state["param_groups"] == ref_saved.optimizer_state["param_groups"]
    for index, state in ref_saved.optimizer_state["state"].items():
        assert saved.optimizer_state["state"][index]["step"] == state["step"]
        _assert_close(saved.optimizer_state["state"][index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2), (2, 4)])
def test_resume_across_stage_counts(reference, tmp_path, first, second):
    ref_params, (ref_losses, _, _), _ = reference
    run = lambda stages, **kw: _single(tmp_path, **kw) if stages == 1 else _pipeline(tmp_path, stages, **kw)[0]  # noqa: E731
    run(first, stop_at=10)
    params = run(second, resume=True)
    losses, _, _ = _losses(tmp_path)
    _assert_close(losses, ref_losses, each=True)
    for name in ref_params:
        _assert_close(params[name], ref_params[name], rtol=1e-5)


def _direct_rank(group, run_dir, steps):
    """A stage drawn by its device's own stream (``own_stream``, here the CPU's): its weights before and
    after the engine's start, then ``steps`` steps of training."""
    mm.manual_seed(1 + group.rank)                       # each rank its own stream, as on separate GPUs
    stage = build_stage(CONFIG, group.rank, group.world_size, device="cpu", own_stream=True)
    drawn = {n: p.data.copy() for n, p in stage.named_parameters()}
    trainer = PipelineTrainer(stage, make_config(**{**RUN, "steps": steps, "eval_interval": 0}), make_dataset(),
                              group.comm, "1f1b", run_dir=run_dir)
    initial = {n: p.data.copy() for n, p in stage.named_parameters()}
    trainer.fit()
    return drawn, initial


def test_a_stage_drawn_by_its_own_stream_draws_only_its_part_and_trains(tmp_path):
    """Stage 0 built directly draws exactly what the whole model's first parts are (same stream, same
    order); the last stage's tied embedding, drawn apart, starts as the first stage's; and the stages
    together train exactly like one process started from their weights."""
    steps = 6
    (drawn0, initial0), (drawn1, initial1) = spawn(_direct_rank, 2, args=(tmp_path / "pp", steps))
    mm.manual_seed(1)
    whole = dict(GPT(CONFIG).named_parameters())
    assert set(drawn0) | set(drawn1) == set(whole)       # nothing missing, nothing extra
    for name, value in drawn0.items():
        np.testing.assert_array_equal(value, whole[name].data)
    assert not np.array_equal(drawn1["wte.weight"], drawn0["wte.weight"])        # drawn apart ...
    np.testing.assert_array_equal(initial1["wte.weight"], initial0["wte.weight"])  # ... made equal
    single = _model()
    single.load_state_dict({**initial1, **initial0})
    trainer = Trainer(single, make_config(**{**RUN, "steps": steps, "eval_interval": 0}), make_dataset(),
                      run_dir=tmp_path / "one")
    trainer.fit()
    _assert_close(_losses(tmp_path / "pp")[0], _losses(tmp_path / "one")[0], each=True)


@pytest.mark.parametrize("stages", [1, 3])
def test_stages_drawn_by_their_own_stream_cover_an_untied_model(stages):
    config = make_model(n_layer=LAYERS, bias=False, tie_embeddings=False).config
    names = [n for stage in range(stages)
             for n, _ in build_stage(config, stage, stages, device="cpu", own_stream=True).named_parameters()]
    assert sorted(names) == sorted(n for n, _ in GPT(config).named_parameters())   # each once: nothing tied


@pytest.mark.parametrize("start", [0, 1, 3])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000, 4096, 5000])
def test_normals_drawn_in_chunks_leave_the_stream_as_one_draw(start, chunk):
    """What ``draws_discarded`` relies on: n float32 normals drawn in chunks of any size (odd ones too:
    PCG64 keeps half of a 64-bit draw for the next 32-bit one) leave the generator exactly where one
    draw of n leaves it, and the samples after are the same."""
    n = 4099
    mm.manual_seed(11)
    backend.cpu_generator().standard_normal(start, dtype=np.float32)    # an odd start: a buffered half or not
    backend.cpu_generator().standard_normal(n, dtype=np.float32)
    after_one = backend.get_rng_state()
    expected = backend.cpu_generator().standard_normal(9, dtype=np.float32)
    mm.manual_seed(11)
    backend.cpu_generator().standard_normal(start, dtype=np.float32)
    layers.discard_normal_draws(n, chunk)
    assert backend.get_rng_state() == after_one
    np.testing.assert_array_equal(backend.cpu_generator().standard_normal(9, dtype=np.float32), expected)


def _pipeline_configs():
    tiny = dict(vocab_size=64, context_length=16, n_layer=4, n_head=2, d_model=16)
    llama = {**GPTConfig.from_preset("llama-tiny").to_dict(), "n_layer": 4}
    return {"tied": GPTConfig(**tiny), "untied": GPTConfig(**tiny, tie_embeddings=False),
            "llama-untied": GPTConfig(**{**llama, "tie_embeddings": False}), "llama-tied": GPTConfig(**llama)}


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("kind", list(_pipeline_configs()))
def test_each_stage_built_alone_holds_the_single_process_weights(kind, stages):
    """Every stage built by itself (the rest drawn and discarded) has, bit for bit, the weights of the
    same parameters of GPT(config) built whole from the same seed; together they cover it (the tied
    wte on the first and last stage); and the random stream ends where the whole build leaves it."""
    config = _pipeline_configs()[kind]
    mm.manual_seed(5)
    whole = {n: p.data for n, p in GPT(config).named_parameters()}
    after_whole = backend.get_rng_state()
    covered = []
    for stage in range(stages):
        mm.manual_seed(5)
        built = build_stage(config, stage, stages)
        assert backend.get_rng_state() == after_whole, f"stage {stage}: the stream ended elsewhere"
        for name, p in built.named_parameters():
            assert p.data.flags.writeable and p.data.flags.c_contiguous, name   # real arrays, no placeholders
            np.testing.assert_array_equal(p.data, whole[name], err_msg=f"stage {stage}: {name}")
            covered.append(name)
    tied = ["wte.weight"] if config.tie_embeddings else []
    assert sorted(covered) == sorted([*whole, *tied])


def test_a_stage_built_alone_holds_no_other_stages_arrays(monkeypatch):
    """Memory traced while a stage is built: what stays allocated is its own parameters (plus its modules'
    few objects), and the peak stays within 100 kB of that (a chunk of discarded samples, 4 kB here; the
    last stage's wpe, 32 kB, drawn with its tied wte and dropped at once). Any other stage's part held
    would add a wte (256 kB) or a block (790 kB); a discarded matrix drawn whole, not by chunks, c_fc's 256 kB."""
    monkeypatch.setattr(layers, "DISCARD_CHUNK", 1000)       # the default's 4 MiB chunk is larger than this model
    config = GPTConfig(vocab_size=512, context_length=64, n_layer=4, n_head=4, d_model=128)
    whole_bytes = 4 * GPT(config).num_parameters()           # 3.5 MB
    for stages, stage in [(4, 1), (4, 3), (2, 0)]:
        mm.manual_seed(0)
        tracemalloc.start()
        try:
            built = build_stage(config, stage, stages)
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        own = sum(p.data.nbytes for p in built.parameters())
        assert own < whole_bytes - 700_000                  # a block (790 kB) or more is another stage's
        assert own <= held < own + 32_000, (stages, stage, held - own)
        assert peak < own + 100_000, (stages, stage, peak - own)


def test_partition_balances_cost():
    assert partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition([1, 1, 1, 1], 2, last_extra=2) == [(0, 3), (3, 4)]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    # GPT-2 124M at T=1024: the head costs ~4.5 blocks, so the last of 2 stages gets 4 of the 12
    from minillm.models import GPTConfig

    assert stage_bounds(GPTConfig.from_preset("gpt2-124m"), 2) == [(0, 8), (8, 12)]
    with pytest.raises(ValueError, match="cannot cut 2 blocks into 3"):
        partition([1, 1], 3)


def _measured_rank(group):
    from minillm.distributed.pipeline import measured_layer_costs

    mm.manual_seed(3)
    before = backend.get_rng_state()
    costs = measured_layer_costs(GPTConfig.from_preset("tiny"), "cpu", comm=group.comm, repeats=1)
    return costs, backend.get_rng_state() == before


def test_measured_costs_are_agreed_by_the_ranks_and_leave_the_stream_alone():
    """Every rank times the parts on its own device; the all-reduce makes the figures the same on all, so
    all cut the same stages (a rank cutting otherwise would hold other blocks: send/recv would disagree).
    The parts are drawn under a saved stream: the weights built after are the ones built without it."""
    (costs0, kept0), (costs1, kept1) = spawn(_measured_rank, 2)
    assert costs0 == costs1 and kept0 and kept1
    blocks, embed, head = costs0
    assert len(blocks) == GPTConfig.from_preset("tiny").n_layer and min(blocks + [embed, head]) > 0
    from minillm.distributed.pipeline import measured_layer_costs

    mm.manual_seed(3)
    measured_layer_costs(CONFIG, "cpu", repeats=1)
    built_after = dict(GPT(CONFIG).named_parameters())
    mm.manual_seed(3)
    for name, p in GPT(CONFIG).named_parameters():
        np.testing.assert_array_equal(p.data, built_after[name].data)


def test_measured_costs_on_a_gpu_and_train_pp_cuts_by_them(gpu, monkeypatch):
    """On a GPU the parts are timed there (the precision in force), and rank_model cuts by them."""
    from minillm.distributed import parallel_trainer, pipeline

    mm.manual_seed(3)
    before = backend.get_rng_state()
    blocks, embed, head = pipeline.measured_layer_costs(CONFIG, gpu, repeats=1)
    assert min(blocks + [embed, head]) > 0 and backend.get_rng_state() == before
    calls = []
    monkeypatch.setattr(pipeline, "measured_layer_costs", lambda *a, **k: calls.append(a) or ([1.0] * 2, 0.0, 9.0))
    mesh = type("Mesh", (), {"shape": type("Shape", (), {"pp": 2})(), "pp_rank": 1, "world": None})()
    stage = parallel_trainer.rank_model(CONFIG, mesh, gpu)
    assert calls and (stage.start, stage.end) == (1, 2)


def test_stages_follow_the_costs_given():
    """The cut follows the costs it is given (measured on a GPU): a head measured at 1.4 blocks
    (gpt2-124m on an H200) gives the last of 2 stages 5 blocks, where FLOPs (4.5 blocks) give it 4."""
    gpt2 = GPTConfig.from_preset("gpt2-124m")
    assert stage_bounds(gpt2, 2, costs=([35.6] * 12, 1.0, 48.5)) == [(0, 7), (7, 12)]
    assert stage_bounds(gpt2, 2) == [(0, 8), (8, 12)]
    assert build_stage(CONFIG, 1, 2, costs=([1.0] * CONFIG.n_layer, 0.0, 100.0)).start == CONFIG.n_layer - 1


def test_stage_names_are_the_models():
    model = _model()
    first, last = PipelineStage(model, 0, 2), PipelineStage(model, 1, 2)
    names = [n for n, _ in first.named_parameters()] + [n for n, _ in last.named_parameters() if n != "wte.weight"]
    assert names == [n for n, _ in model.named_parameters()]
    assert last.tied_parameters() == [model.wte.weight]


def test_token_batches_are_checked_on_the_host():
    from minillm.distributed.pipeline import check_token_batch

    ok = np.array([[0, 31]])
    check_token_batch(ok, np.array([[-100, 5]]), 32)      # -100 targets are ignored, not errors
    with pytest.raises(ValueError, match="token id 32 is out of range for a vocabulary of 32"):
        check_token_batch(np.array([[0, 32]]), ok, 32)
    with pytest.raises(ValueError, match="target id -1 is out of range"):
        check_token_batch(ok, np.array([[-1, 0]]), 32)
