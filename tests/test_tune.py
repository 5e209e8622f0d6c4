"""`dit_accel.tune` / `dit-accel tune` and the plan files they write, on tiny random-weight pipelines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import math

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

import dit_accel
from dit_accel import Budget, ConfigError, Target
from dit_accel.cli import main
from dit_accel.techniques import ModelCheckConfig
from dit_accel.models.identity import model_identity
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline
from dit_accel.tuning import Candidate, Predictor, predicted_quality
from dit_accel.tuning.target import Bound, judge_refusal

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green circle", "a red square"]
STEPS = 6


def _call(family: str = "sd3") -> dict:
    call = tiny_call_kwargs(family)
    for key in ("prompt", "generator", "output_type", "num_inference_steps"):
        call.pop(key, None)
    return call


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        same = torch.equal(torch.as_tensor(x), torch.as_tensor(y)) if isinstance(x, torch.Tensor) else x == y
        if not same:
            return False
    return True


def test_targets_and_budgets_parse_and_refuse_nonsense():
    assert Target.parse("psnr=28.5") == Target((Bound("psnr", 28.5),)) and Target.parse("ssim=0.9").value == 0.9
    assert Target.parse("30") == Target() and str(Target()) == "psnr>=30"
    assert Budget.parse("45m") == Budget(seconds=2700) and Budget.parse("90s").seconds == 90
    assert Budget.parse("120gen") == Budget(seconds=None, generations=120) and Budget.parse(None) == Budget()
    for bad, message in (("lpips=0.1", "valid metrics"), ("psnr=high", "metric=value"), ("ssim=3", "(0, 1]")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
            Target.parse(bad)
    with pytest.raises(ConfigError, match="45m"):
        Budget.parse("soon")


def test_stacks_are_predicted_from_their_members_and_corrected_by_the_stacks_run():
    def single(label, config, psnr, flops, dense_seconds):
        candidate = Candidate(label, [config], psnr_frames=psnr, flops_ratio=flops, seconds=1.0,
                              dense_seconds=dense_seconds, batches=1)
        candidate.members = (candidate,)
        return candidate

    a = single("a", FirstBlockCacheConfig(threshold=0.2), [30.0, 30.0], 0.5, 1.8)  # efficiency 0.9
    b = single("b", dit_accel.RASConfig(), [30.0], 0.8, 1.25)  # efficiency 1.0
    predictor = Predictor(("psnr",))
    predictor.observe(a)
    predictor.observe(b)
    stack = Candidate("a+b", a.configs + b.configs, (a, b))
    added = 30 - 10 * math.log10(2)  # equal errors add: twice the MSE is 3 dB less
    assert predicted_quality((a, b), "psnr") == pytest.approx(added)
    assert predictor.quality(stack) == pytest.approx(added)
    # FLOPs speedups multiply, at the worse member's efficiency
    assert predictor.speed(stack) == pytest.approx(0.9 / (0.5 * 0.8))
    # a stack that ran 3 dB under the added errors, at 0.8 of its members' efficiency, corrects the next one
    stack.batches, stack.psnr_frames, stack.flops_ratio, stack.seconds, stack.dense_seconds = 1, [added - 3], 0.4, 1.0, 1.8
    predictor.observe(stack)
    other = Candidate("b+a", b.configs + a.configs, (b, a))
    assert predictor.quality(other) == pytest.approx(added - 3)
    assert predictor.speed(other) == pytest.approx(0.9 * 0.8 / 0.4)


def test_plan_files_round_trip_and_are_refused_for_another_model(pipe, tmp_path):
    configs = [dit_accel.RASConfig.for_steps(STEPS, sample_ratio=0.5), dit_accel.DyDiTConfig.preset("fast"),
               TaylorSeerCacheConfig(cache_interval=2, taylor_factors_dtype=torch.float32)]
    magcache = [MagCacheConfig(threshold=0.06, mag_ratios=torch.linspace(1, 0.9, STEPS), num_inference_steps=STEPS),
                dit_accel.FlexDiTConfig.preset("balanced")]
    for plan, name in ((configs, "plan.json"), (magcache, "plan.yaml")):
        path = tmp_path / name
        dit_accel.save_plan(path, plan, pipe, num_inference_steps=STEPS, target="psnr>=30")
        check, *loaded = dit_accel.load_plan(path)
        assert isinstance(check, ModelCheckConfig) and check.num_inference_steps == STEPS
        assert len(loaded) == len(plan) and all(_equal(a, b) for a, b in zip(plan, loaded))
        assert all(_equal(a, b) for a, b in zip(parse_plan(str(path), STEPS)[1:], loaded))
        dit_accel.apply(pipe, *dit_accel.load_plan(path)).remove()  # its own model: accepted
    other = tiny_pipeline("sd3", seed=1)  # the same architecture, other weights
    with pytest.raises(ConfigError, match="does not fit this model: .*other weights"):
        dit_accel.apply(other, *dit_accel.load_plan(tmp_path / "plan.json"))
    dit_accel.apply(other).remove()  # the refusal left nothing attached
    with pytest.raises(ConfigError, match="another model class"):
        dit_accel.apply(tiny_pipeline("pixart"), *dit_accel.load_plan(tmp_path / "plan.json"))
    with pytest.raises(ConfigError, match=f"tuned for {STEPS} steps, not 9"):
        parse_plan(str(tmp_path / "plan.json"), 9)
    # a call with other steps is refused at its first transformer call, before any block runs
    with dit_accel.apply(pipe, *dit_accel.load_plan(tmp_path / "plan.json")):
        with pytest.raises(ConfigError, match=f"tuned for {STEPS} steps; this call runs 3"):
            pipe(**_call(), prompt=PROMPTS[0], num_inference_steps=3)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not a dit-accel plan file"):
        dit_accel.load_plan(tmp_path / "bad.json")


def test_the_weight_fingerprint_does_not_depend_on_module_order():
    # cache-dit's enable/disable re-registers modules: the same weights, in another order
    first, second = torch.nn.Module(), torch.nn.Module()
    first.a, first.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    second.b, second.a = torch.nn.Linear(3, 2), torch.nn.Linear(3, 3)
    second.load_state_dict(first.state_dict())
    assert list(first.state_dict()) != list(second.state_dict())
    assert model_identity(first) == model_identity(second)
    with torch.no_grad():
        second.a.weight[0, 0] += 1
    assert model_identity(first)["weights"] != model_identity(second)["weights"]


def test_the_accelerated_pipeline_takes_a_plan_file(pipe, tmp_path):
    from dit_accel.pipelines import AcceleratedStableDiffusion3Pipeline

    path = tmp_path / "plan.json"
    dit_accel.save_plan(path, [FirstBlockCacheConfig(threshold=0.3)], pipe, num_inference_steps=STEPS)
    accelerated = AcceleratedStableDiffusion3Pipeline.from_pipe(pipe, acceleration=str(path))
    accelerated(**_call(), prompt=PROMPTS[0], num_inference_steps=STEPS)
    assert accelerated.acceleration_report()["flops_ratio"] < 1
    accelerated.set_acceleration(None)
    with pytest.raises(ConfigError, match="does not fit this model"):
        AcceleratedStableDiffusion3Pipeline.from_pipe(tiny_pipeline("sd3", seed=1), acceleration=str(path))


def test_tune_finds_a_plan_that_meets_the_target_within_its_budget(pipe, tmp_path):
    path = tmp_path / "tuned.json"
    result = dit_accel.tune(pipe, PROMPTS, target="psnr=20", steps=STEPS, batch=2, budget="60gen",
                            held_out=PROMPTS[:2][::-1], path=path, **_call())
    assert result.generations <= 60
    tried = [c for c in result.candidates if c.batches]
    assert len(tried) >= 5 and all(c.quality("psnr") is not None for c in tried)
    if result.configs:  # on a tiny model a plan may not beat dense's wall clock; when one does it holds
        winner = next(c for c in result.candidates if c.label == result.label)
        assert winner.status == "meets the target" and result.quality >= 20 and winner.batches == 2
        assert result.held_out_quality is not None and result.quality_moved is not None
    else:
        assert "dense is returned" in result.message
    content = json.loads(path.read_text())
    assert content["target"] == "psnr>=20" and content["measured"]["generations"] == result.generations
    assert content["num_inference_steps"] == STEPS and content["threads"] == torch.get_num_threads()
    loaded = dit_accel.load_plan(path)[1:]
    assert len(loaded) == len(result.configs)


def test_tune_stops_at_its_budget_and_returns_the_best_so_far(pipe):
    result = dit_accel.tune(pipe, PROMPTS, target="psnr=20", steps=STEPS, batch=2, budget="12gen", **_call())
    assert result.generations <= 12
    assert any(c.status == "budget spent" or not c.batches for c in result.candidates)


def test_a_target_no_plan_meets_returns_dense_with_a_message(pipe):
    result = dit_accel.tune(pipe, PROMPTS[:2], target="psnr=150", steps=STEPS, batch=2, budget="40gen", **_call())
    assert result.configs == [] and result.label == "dense" and result.speedup == 1.0
    assert "no plan met psnr>=150" in result.message and "dense is returned" in result.message


def test_bad_input_is_refused_before_any_generation(pipe, tmp_path, capsys):
    with pytest.raises(ConfigError, match="non-empty list of prompts"):
        dit_accel.tune(pipe, [], **_call())
    with pytest.raises(ConfigError, match="no generator"):
        dit_accel.tune(pipe, PROMPTS, generator=torch.Generator(), **_call())
    for argv, message in ((["--target", "psnr=x"], "metric=value"), (["--budget", "later"], "45m"),
                          (["--out", str(tmp_path / "plan.txt")], ".json, .yaml or .yml"),
                          (["--model", "tiny:sd3"], "--prompts FILE")):
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", "--quiet", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_cli_tune_then_generate_and_bench_with_the_plan_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    plan = tmp_path / "plan.json"
    assert main(["tune", "--model", "tiny:sd3", "--prompts", str(prompts), "--steps", str(STEPS), "--batch", "2",
                 "--target", "psnr=20", "--budget", "40gen", "--out", str(plan), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "candidates tried" in out and plan.is_file()
    search = json.loads(plan.with_name("plan.search.json").read_text())
    assert search["model"] == "tiny:sd3" and search["candidates"]
    assert main(["generate", "--model", "tiny:sd3", "--steps", str(STEPS), "--plan", str(plan),
                 "--out", str(tmp_path / "gen"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert summary["runs"][1]["label"] == str(plan)
    assert main(["bench", "--model", "tiny:sd3", "--steps", str(STEPS), "--plan", str(plan), "--prompts",
                 str(prompts), "--count", "2", "--batch", "2", "--out", str(tmp_path / "bench"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert rows[2]["label"] == str(plan) and rows[2]["status"] == "ok"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny:sd3", "--steps", "3", "--plan", str(plan), "--out", str(tmp_path / "g"),
              "--quiet"])
    assert exit_info.value.code == 2 and "tuned for 6 steps" in capsys.readouterr().err


def test_fewer_steps_is_a_candidate_and_the_plan_is_never_slower_than_it(pipe):
    """Fewer steps (a plan member now) is searched, goes bolder while it holds, and its fastest setting
    that meets the target always runs in the final: the tuned plan is at least as fast as it, and when it
    wins on its own the message says so."""
    result = dit_accel.tune(pipe, PROMPTS[:2], target="psnr=5", steps=STEPS, batch=2, budget="80gen", **_call())
    fewer = [c for c in result.candidates if c.label.startswith("steps:") and c.final_speedup is not None]
    assert len(fewer) == 1, "the best fewer-steps setting runs in the final"
    assert [c.label for c in result.candidates if c.label.startswith("steps:")][:2] == ["steps:count=4", "steps:count=3"]
    assert result.speedup >= fewer[0].final_speedup
    if result.label == fewer[0].label:
        assert result.message.startswith("fewer steps alone is the fastest plan")
    else:
        assert f"the best fewer-steps setting, {fewer[0].label}" in result.message


def test_targets_combine_and_the_first_metric_is_the_primary_one():
    target = Target.parse("psnr=30, ssim=0.9,perceptual=0.1,judge=0.95")
    assert str(target) == "psnr>=30,ssim>=0.9,perceptual<=0.1,judge>=0.95" and target.metric == "psnr"
    assert target.metrics == ("psnr", "ssim", "perceptual", "judge")
    holds = {"psnr": 31.0, "ssim": 0.95, "perceptual": 0.05, "judge": 0.96}
    assert target.met(holds.get)
    # every bound at once: a distance is kept from above, the others from below; one miss misses the target
    assert not target.met({**holds, "perceptual": 0.11}.get) and not target.met({**holds, "judge": 0.9}.get)
    assert not target.met({**holds, "judge": None}.get)  # not measured: not met
    # the first batch may miss each bound by its metric's margin and still run on the others
    assert target.near({**holds, "psnr": 29.5, "perceptual": 0.115}.get) and not target.near({**holds, "psnr": 28.5}.get)
    # the speed mode ranks by a bare metric; its valued bounds are floors
    ranked = Target.parse("ssim,psnr=25")
    assert ranked.primary == Bound("ssim") and str(ranked.floors()) == "psnr>=25" and Target.parse("ssim").floors() is None
    assert Bound("perceptual", 0.1).score(0.05) > Bound("perceptual", 0.1).score(0.2)
    for bad, message in (("psnr=30,psnr=31", "psnr named twice"), ("judge=1.5", "judge targets lie in"),
                         ("perceptual=-0.1", "perceptual targets lie in"), ("psnr=30,lpips=0.1", "valid metrics")):
        with pytest.raises(ConfigError, match=message):
            Target.parse(bad)


def test_targets_are_refused_before_any_generation(pipe, monkeypatch, tmp_path, capsys):
    """A bare metric without a speed, a speed of 1, and a judge bound the judge cannot read (not a reference
    model, or prompts that are not its captions) are refused by name before anything runs."""
    def no_generation(*args, **kwargs):
        raise AssertionError("something was generated")

    monkeypatch.setattr("dit_accel.tuning.search.timed_run", no_generation)
    for kwargs, message in ((dict(target="ssim"), r"ssim needs a value \(ssim=...\)"),
                            (dict(speedup=1.0), "ask for more than 1"),
                            (dict(target="psnr=30,judge=0.95"), r"judge cannot be evaluated here: the judges read only "
                             r"the procedural scenes the reference models \(reference:image, reference:detail\) draw")):
        with pytest.raises(ConfigError, match=message):
            dit_accel.tune(pipe, PROMPTS, steps=STEPS, **kwargs, **_call())
    captions = ["a small red circle on the left, blue plain background"]
    assert judge_refusal("reference:image", captions, video=False) is None
    assert "'a cat' is not one" in judge_refusal("reference:image", ["a cat"], video=False)
    assert "reference:video" in judge_refusal("reference:image", captions, video=True)
    assert "'stabilityai/stable-diffusion-3.5-medium' is not one" in judge_refusal(
        "stabilityai/stable-diffusion-3.5-medium", captions, video=False)
    # the command refuses it before the model loads
    monkeypatch.setattr("dit_accel.testing.tiny_pipeline", no_generation)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    for argv, message in ((["--target", "judge=0.9"], "judge cannot be evaluated here"),
                          (["--speedup", "0.5"], "must be >= 1.0"), (["--speedup", "1"], "ask for more than 1"),
                          (["--target", "ssim"], "ssim needs a value"), (["--target", "psnr=30,judge=2"], "(0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", "--model", "tiny:sd3", "--prompts", str(prompts), "--quiet", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_the_speed_mode_returns_the_best_quality_at_the_speed(pipe, tmp_path):
    """`speedup=`: the finalists' side-by-side speedups decide who is at the speed, and of those the best
    PSNR wins; a speed no plan reaches returns dense, said plainly."""
    path = tmp_path / "fast.json"
    result = dit_accel.tune(pipe, PROMPTS[:2], speedup=1.2, steps=4, batch=2, budget="36gen", path=path, **_call())
    assert result.wanted_speedup == 1.2 and result.target == Target.parse("psnr") and result.generations <= 36
    finalists = [c for c in result.candidates if c.final_speedup is not None]
    reached = [c for c in finalists if c.final_speedup >= 1.2]
    if result.configs:  # timings on a shared CPU decide whether any plan reaches 1.2x here
        assert result.speedup >= 1.2 and result.label in [c.label for c in reached]
        assert result.quality == max(c.quality("psnr") for c in reached)
        assert "the best psnr at >= 1.2x" in result.message
    else:
        assert result.message.startswith("no plan reached 1.2x") and "dense is returned" in result.message
    assert json.loads(path.read_text())["target"] == "best psnr at speedup>=1.2"
    slow = dit_accel.tune(pipe, PROMPTS[:2], speedup=1000, target="ssim,psnr=5", steps=4, batch=2, budget="16gen",
                          **_call())
    assert slow.configs == [] and slow.label == "dense" and slow.speedup == 1.0
    assert slow.message.startswith("no plan reached 1000x keeping psnr>=5 on these prompts") and \
        "dense is returned" in slow.message
    assert slow.goal == "best ssim at speedup>=1000, keeping psnr>=5"


def test_a_judge_target_tunes_on_the_reference_model():
    """On the reference model and its captions the judge's agreement with dense is measured for every
    candidate and kept with the other bounds."""
    from dit_accel.metrics import procedural
    from dit_accel.testing.reference import reference_call_kwargs, reference_pipeline

    pipe = reference_pipeline("image")
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in reference_call_kwargs("image").items() if k not in ("prompt", "num_inference_steps")}
    captions = [scene.caption for scene in procedural.image_batch(2, 0)[1]]
    result = dit_accel.tune(pipe, captions, target="psnr=10,judge=0.5", steps=3, batch=2, budget="14gen", **call)
    tried = [c for c in result.candidates if c.batches]
    assert tried and all(0 <= c.quality("judge") <= 1 and c.judge_readings == 2 * 6 for c in tried)
    summary = result.summary()
    assert summary["target"] == "psnr>=10,judge>=0.5" and "judge" in summary["candidates"][0]
