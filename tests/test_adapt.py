"""The trained networks beyond MNIST (photo patches, digits, scikit-image and matplotlib sample patches) and
``policy-adapt``, which adapts a policy to a trained network."""
import json

import numpy as np
import pytest
import torch

from adaptive_core.policy import N_OBSERVATIONS, OBSERVATION_NAMES, load_policy
from adaptive_core.testbeds import TRAINED_TESTBED_NAMES, make_testbed


def test_photo_patches_come_from_disjoint_columns_and_are_deterministic():
    from adaptive_core.testbeds.photo_data import PATCH, SPLIT_COLUMNS, load_photo_patches, photos, random_photo_crops
    base = photos()
    assert base.shape == (2, 213, 320) and base.min() >= -1 and base.max() <= 1
    train, test = load_photo_patches("train"), load_photo_patches("test")
    assert train.shape[1:] == test.shape[1:] == (1, PATCH, PATCH) and len(train) > 4 * len(test) > 0
    assert torch.equal(train, load_photo_patches("train"))
    # the first test patch is the top-left window of the test columns of the first photo
    lo = SPLIT_COLUMNS["test"][0]
    assert torch.equal(test[0, 0], base[0, :PATCH, lo:lo + PATCH])
    assert SPLIT_COLUMNS["train"][1] <= lo
    a = random_photo_crops(16, torch.Generator().manual_seed(3))
    b = random_photo_crops(16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (16, 1, PATCH, PATCH)
    # every crop is a window (or its mirror image) of the train columns
    region = base[:, :, :SPLIT_COLUMNS["train"][1]]
    windows = region.unfold(1, PATCH, 1).unfold(2, PATCH, 1).reshape(-1, PATCH, PATCH)
    for crop in a[:4, 0]:
        assert any(bool(((windows - c).abs().amax((1, 2)) == 0).any()) for c in (crop, crop.flip(-1)))
    with pytest.raises(ValueError, match="unknown split"):
        load_photo_patches("validation")


def test_photo_testbed_is_an_unconditional_network_with_its_own_configuration(tmp_path):
    """photo_unet: a trained testbed without labels or CFG; one configuration per model type, keyed without a
    CFG scale; a weights file names its own testbed class."""
    from adaptive_core.testbeds.train import save_denoiser, train
    from adaptive_core.testbeds.trained import PhotoDenoiser, TrainedDenoiser, trained_testbed
    from adaptive_core.tune.policy_env import Config, config_noise, configs_of
    assert "photo_unet" in TRAINED_TESTBED_NAMES
    tb = make_testbed("photo_unet", "flow")
    assert isinstance(tb, PhotoDenoiser) and tb.name == "photo_unet-flow" and not tb.conditional
    with pytest.raises(ValueError, match="unconditional"):
        tb.set_labels([1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        make_testbed("photo_unet", "ve", cfg_scale=2.0)
    (config,) = configs_of([("photo_unet", "flow")], cfg_scales=(1.0, 2.0))
    assert config == Config("photo_unet", "flow", 1.0) and config.key == "photo_unet-flow" and config.trained
    x = config_noise(config, tb, range(3))
    out = tb(x, torch.full((3,), 0.5))
    assert out.shape == x.shape and torch.isfinite(out).all() and tb.labels is None
    assert tb.sample_data(4).shape == (4, 1, 32, 32)
    torch.manual_seed(0)
    model, _, facts = train("ve", 2, batch=4, data="photo", progress=False)
    assert facts["family"] == "photo_unet" and facts["conditional"] is False
    save_denoiser(model, tmp_path / "photo_ve.safetensors", facts)
    assert type(trained_testbed(tmp_path / "photo_ve.safetensors")) is PhotoDenoiser
    assert type(trained_testbed(make_testbed("mnist_unet", "ve").path)) is TrainedDenoiser
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a weights file"):
        trained_testbed(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="unknown training data"):
        train("ve", 1, data="cifar")


def test_trained_testbed_names_match_their_classes_and_training_data():
    """The name lists of adaptive_core.testbeds (kept import-light) agree with the testbed classes and with the
    training data sets that write their weights."""
    from adaptive_core.testbeds import CONDITIONAL_TESTBED_NAMES
    from adaptive_core.testbeds.train import DATASETS
    from adaptive_core.testbeds.trained import TRAINED_FAMILIES
    assert set(TRAINED_FAMILIES) == set(TRAINED_TESTBED_NAMES)
    assert {n for n, cls in TRAINED_FAMILIES.items() if cls.conditional} == set(CONDITIONAL_TESTBED_NAMES)
    assert {cls.data: cls.family for cls in TRAINED_FAMILIES.values()} == {d: f for d, (f, _) in DATASETS.items()}


def test_digits_testbed_is_a_third_class_conditional_network():
    """digits_unet: scikit-learn's digits upsampled to 32×32 in [−1, 1] with their labels; a class-conditional
    trained testbed with one configuration per CFG scale, whose labels and CFG change its output."""
    from adaptive_core.testbeds.digits_data import SPLITS, load_digits_images
    from adaptive_core.testbeds.trained import DigitsDenoiser
    from adaptive_core.tune.policy_env import config_noise, configs_of
    images, labels = load_digits_images("train")
    test_images, _ = load_digits_images("test")
    assert images.shape == (SPLITS["train"][1], 1, 32, 32) and len(test_images) == 1797 - SPLITS["train"][1]
    assert images.min() >= -1 and images.max() <= 1 and images[:, :, 0, 0].max() < -0.5   # dark corners
    assert labels[:10].tolist() == list(range(10))
    with pytest.raises(ValueError, match="unknown split"):
        load_digits_images("val")
    assert [c.key for c in configs_of([("digits_unet", "ve")], (1.0, 2.0))] == ["digits_unet-ve-cfg1",
                                                                                "digits_unet-ve-cfg2"]
    one, two = make_testbed("digits_unet", "ve"), make_testbed("digits_unet", "ve", cfg_scale=2.0)
    assert isinstance(one, DigitsDenoiser) and one.conditional
    (config, _) = configs_of([("digits_unet", "ve")], (1.0, 2.0))
    x = config_noise(config, one, range(4))
    two.set_labels(one.labels)
    sigma = torch.full((4,), 1.0)
    seed_labels = one(x, sigma)
    assert not torch.allclose(seed_labels, two(x, sigma))
    one.set_labels([3, 3, 3, 3])
    assert not torch.allclose(one(x, sigma), seed_labels)


def test_skimage_testbed_is_a_fourth_network_with_its_own_data_and_architecture(tmp_path):
    """skimage_unet: patches of ten scikit-image sample images, split by column and deterministic; an unconditional
    network whose weights file records its own (narrower, attention-free) architecture."""
    pytest.importorskip("skimage")
    from adaptive_core.testbeds.patch_sets import PATCH, split_columns
    from adaptive_core.testbeds.skimage_data import (IMAGE_NAMES, load_skimage_patches, random_skimage_crops,
                                                     skimage_images)
    from adaptive_core.testbeds.train import DATASET_CONFIGS, save_denoiser, train
    from adaptive_core.testbeds.trained import SkimageDenoiser, trained_testbed
    images = skimage_images()
    assert len(images) == len(IMAGE_NAMES) and all(im.ndim == 2 and -1 <= im.min() <= im.max() <= 1 for im in images)
    train_patches, test_patches = load_skimage_patches("train"), load_skimage_patches("test")
    assert train_patches.shape[1:] == test_patches.shape[1:] == (1, PATCH, PATCH)
    assert len(train_patches) > 4 * len(test_patches) > 0 and torch.equal(train_patches, load_skimage_patches("train"))
    cut, _ = split_columns(images[0], "test")      # the first test patch: top-left window of the test columns
    assert torch.equal(test_patches[0, 0], images[0][:PATCH, cut:cut + PATCH])
    crops = random_skimage_crops(8, torch.Generator().manual_seed(1))
    assert torch.equal(crops, random_skimage_crops(8, torch.Generator().manual_seed(1)))
    for crop in crops[:4, 0]:   # a window (or its mirror image) of some image's train columns
        found = False
        for im in images:
            region = im[:, :split_columns(im, "train")[1]]
            windows = region.unfold(0, PATCH, 1).unfold(1, PATCH, 1).reshape(-1, PATCH, PATCH)
            found = found or any(bool(((windows - c).abs().amax((1, 2)) == 0).any()) for c in (crop, crop.flip(-1)))
        assert found
    with pytest.raises(ValueError, match="unknown split"):
        load_skimage_patches("val")
    tb = make_testbed("skimage_unet", "ve")
    assert isinstance(tb, SkimageDenoiser) and not tb.conditional and tb.name == "skimage_unet-ve"
    assert tb.net.config == DATASET_CONFIGS["skimage"] and not tb.net.config.attention
    x = torch.randn(2, 1, 32, 32) * 5
    assert torch.isfinite(tb(x, torch.full((2,), 5.0))).all()
    torch.manual_seed(0)
    model, _, facts = train("flow", 2, batch=4, data="skimage", progress=False)
    assert facts["family"] == "skimage_unet" and model.config == DATASET_CONFIGS["skimage"]
    save_denoiser(model, tmp_path / "skimage_flow.safetensors", facts)
    loaded = trained_testbed(tmp_path / "skimage_flow.safetensors")
    assert type(loaded) is SkimageDenoiser and loaded.net.config == DATASET_CONFIGS["skimage"]


def test_mpl_testbed_is_a_fifth_network_on_matplotlibs_sample_data(tmp_path):
    """mpl_unet: patches of matplotlib's sample terrain, MRI slice and portrait, each scaled to [−1, 1] by its range
    and split by column (patch_sets); an unconditional network with its own architecture in its weights file."""
    from adaptive_core.testbeds.mpl_data import SAMPLE_FILES, load_mpl_patches, mpl_images, random_mpl_crops
    from adaptive_core.testbeds.patch_sets import PATCH, split_columns
    from adaptive_core.testbeds.train import DATASET_CONFIGS, save_denoiser, train
    from adaptive_core.testbeds.trained import MplDenoiser, trained_testbed
    images = mpl_images()
    assert [tuple(im.shape) for im in images] == [(344, 403), (256, 256), (600, 512)] and len(SAMPLE_FILES) == 3
    for im in images:   # each spans [−1, 1] exactly
        assert float(im.min()) == -1.0 and float(im.max()) == 1.0
    train_patches, test_patches = load_mpl_patches("train"), load_mpl_patches("test")
    assert len(train_patches) > 4 * len(test_patches) > 0 and train_patches.shape[1:] == (1, PATCH, PATCH)
    lo, _ = split_columns(images[0], "test")
    assert torch.equal(test_patches[0, 0], images[0][:PATCH, lo:lo + PATCH])
    assert split_columns(images[0], "train")[1] == lo
    with pytest.raises(ValueError, match="unknown split"):
        split_columns(images[0], "val")
    crops = random_mpl_crops(6, torch.Generator().manual_seed(2))
    assert torch.equal(crops, random_mpl_crops(6, torch.Generator().manual_seed(2)))
    assert crops.shape == (6, 1, PATCH, PATCH) and crops.abs().max() <= 1
    tb = make_testbed("mpl_unet", "flow")
    assert isinstance(tb, MplDenoiser) and not tb.conditional and tb.net.config == DATASET_CONFIGS["mpl"]
    assert torch.isfinite(tb(torch.randn(2, 1, 32, 32), torch.full((2,), 0.7))).all()
    torch.manual_seed(0)
    model, _, facts = train("ve", 2, batch=4, data="mpl", progress=False)
    assert facts["family"] == "mpl_unet" and model.config == DATASET_CONFIGS["mpl"]
    save_denoiser(model, tmp_path / "mpl_ve.safetensors", facts)
    assert type(trained_testbed(tmp_path / "mpl_ve.safetensors")) is MplDenoiser


def test_oracle_grid_teacher_can_label_rows_outside_the_policys_range_and_the_student_keeps_their_range(tmp_path):
    """With grid_rows_in_range, rows of a run with a grid are labelled even where the policy would fall back (a
    new network's features); the student exported with fallback_range="data" takes its range from its own rows."""
    from adaptive_core.tune.policy_distill import OracleGridTeacher, export_student, new_student, trained_on_of
    from adaptive_core.tune.policy_env import Config, configs_of, host_grid
    torch.set_num_threads(1)
    policy = load_policy("ppo_ve_flow")
    tb = make_testbed("gaussian", "ve")
    host = host_grid(tb, 5)
    grid = {"gaussian-ve": {"5": {"sigmas": [float(s) for s in host]}}}
    row = np.tile(policy._mean, (2, 1))
    row[:, OBSERVATION_NAMES.index("lambda_progress")] = 0.3
    row[:, OBSERVATION_NAMES.index("budget_used")] = 0.4
    row[1, 0] = policy._hi[0] + 10.0 * (policy._hi[0] - policy._lo[0])     # far outside the range
    assert policy.decide(row)[1][1] is not None
    for in_range, want in ((False, [None, "outside"]), (True, [None, None])):
        teacher = OracleGridTeacher(policy, grid, grid_rows_in_range=in_range)
        teacher.set_context(Config("gaussian", "ve"), 5, host)
        reasons = teacher.decide(row)[1]
        assert reasons[0] is None and (reasons[1] is None) == (want[1] is None)
    teacher.set_context(Config("gaussian", "ve"), 6, host_grid(tb, 6))     # no grid: the policy's own reasons
    assert teacher.decide(row)[1][1] is not None
    obs = np.random.default_rng(0).normal(3.0, 2.0, size=(64, N_OBSERVATIONS))
    student = new_student(obs, policy.n_actions, (8,))
    configs = configs_of([("gaussian", "ve"), ("photo_unet", "flow"), ("mnist_unet", "ve")], (1.0, 2.0))
    trained_on = trained_on_of(configs, [5, 8])
    assert trained_on["configurations"] == ["gaussian-ve", "photo_unet-flow", "mnist_unet-ve-cfg1",
                                            "mnist_unet-ve-cfg2"] and trained_on["cfg_scales"] == [1.0, 2.0]
    path = export_student(student, policy, tmp_path / "s.onnx", training={}, metrics={}, trained_on=trained_on,
                          fallback_range="data")
    manifest = json.loads(path.read_text())
    assert np.allclose(manifest["normalisation"]["mean"], obs.mean(0), atol=1e-5)
    assert manifest["trained_on"] == trained_on and "own training rows" in manifest["normalisation"]["formula"]
    assert load_policy(path).out_of_range(obs[:4]) == [None] * 4
    with pytest.raises(ValueError, match="fallback_range"):
        export_student(student, policy, tmp_path / "t.onnx", training={}, metrics={}, fallback_range="both")


def test_policy_adapt_fits_grids_distils_and_measures_in_one_command(tmp_path, capsys):
    """A tiny policy-adapt run on the photo network: the oracle grid file, an adapted policy that knows the new
    configuration and loads, a report with every measured row (the new network and the starting configurations),
    its markdown and its plot; a second run reuses the grid file; bad arguments are refused."""
    pytest.importorskip("onnxruntime")
    from adaptive_core.bench import trained_oracle
    from adaptive_core.tune.policy_adapt import main
    torch.set_num_threads(1)
    common = ["--testbeds", "photo_unet:flow,gaussian@exponent=1.5:ve", "--out-dir", str(tmp_path), "--budgets", "4",
              "--fit-seeds", "2", "--seeds", "2", "--epochs", "1", "--dagger-epochs", "1", "--rounds", "1",
              "--eval-budgets", "4", "--eval-seeds", "2", "--check-seeds", "2", "--jobs", "1",
              "--reference-steps", "16"]
    assert main([*common, "--name", "tiny"]) == 0
    grids = json.loads((tmp_path / "tiny_oracle.json").read_text())["configs"]
    assert sorted(grids) == ["gaussian@exponent=1.5-ve", "photo_unet-flow"]
    assert all(len(g["4"]["sigmas"]) == 5 for g in grids.values())
    adapted = load_policy(tmp_path / "tiny.json")
    trained_on = adapted.manifest.trained_on
    for key in ("photo_unet-flow", "gaussian@exponent=1.5-ve", "mnist_unet-ve-cfg2"):
        assert key in trained_on["configurations"]
    assert adapted.manifest.training["oracle_grids"]["cells"] == ["gaussian@exponent=1.5-ve@4", "photo_unet-flow@4"]
    report = json.loads((tmp_path / "tiny_report.json").read_text())
    assert [(r["configuration"], r["nfe"]) for r in report["new"]] == [("photo_unet-flow", 4),
                                                                        ("gaussian@exponent=1.5-ve", 4)]
    for row in report["new"]:
        for key in ("heuristic", "start", "adapted", "oracle", "best_peer_rmse"):
            assert 0 < row[key] < 2
        assert row["adapted_vs_heuristic"] == pytest.approx(row["adapted"] / row["heuristic"])
        lo, hi = row["adapted_vs_heuristic_ci90"]
        assert lo <= hi
    start_configs = load_policy("ppo_ve_flow").manifest.trained_on["configurations"]
    assert [r["configuration"] for r in report["check"]] == start_configs
    assert all(r["adapted_vs_start"] > 0 for r in report["check"])
    text = (tmp_path / "tiny_report.md").read_text()
    assert "| photo_unet-flow | 4 |" in text and (tmp_path / "tiny_report.png").stat().st_size > 0
    assert "adapted / start" in capsys.readouterr().out
    # the grid file can be reused (no fit), the check and the peers left out
    before = (tmp_path / "tiny_oracle.json").read_text()
    assert main([*common, "--name", "again", "--grids", str(tmp_path / "tiny_oracle.json"), "--check-seeds", "0",
                 "--no-peers"]) == 0
    report = json.loads((tmp_path / "again_report.json").read_text())
    assert report["check"] == [] and all("best_peer" not in r and "oracle" in r for r in report["new"])
    assert not (tmp_path / "again_oracle.json").exists() and (tmp_path / "tiny_oracle.json").read_text() == before
    # bad input is refused with a message
    for bad in (["--testbeds", "nosuch:ve"], ["--testbeds", "gaussian@exponent:ve"],
                ["--testbeds", "photo_unet@cfg=2:ve"], ["--testbeds", "photo_unet:flow", "--budgets", "2"],
                ["--testbeds", "photo_unet:flow", "--reference-steps", "4"],
                ["--testbeds", "photo_unet:flow", "--grids", str(tmp_path / "missing.json")],
                ["--testbeds", "photo_unet:flow", "--policy", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit):
            main([*bad, "--name", "x", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        trained_oracle.main(["--testbed", "photo_unet", "--cfg", "2", "--out", str(tmp_path / "o.json")])
