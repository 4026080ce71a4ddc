"""metrics: the classifier analysis and every quality metric by hand, then each metric where it must fail:
on the CIFAR-10 copy, with two small classifiers trained here, real images score better than the known-bad
inputs (pixel ascent, shuffled pixels, uniform noise, real images of another class), by more than the
seed-to-seed spread, on every metric but pixel ascent's activation (metrics.py's docstring lists them)."""
import collections
import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import data
import featureviz as fv
import metrics
import models
import training


def test_confusion_report_and_hardest_pairs():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 0, 2, 1, 1, 1])
    cm = metrics.confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 2, 0], [1, 1, 0], [0, 3, 1]]
    report = metrics.per_class_report(cm, ["a", "b", "c"])
    assert report[1] == dict(cls="b", precision=pytest.approx(1 / 6), recall=0.5, support=2)
    assert metrics.hardest_pairs(cm, ["a", "b", "c"], k=2) == [("c", "b", 3), ("a", "b", 2)]
    # only pairs that were confused, never a class with itself, and k beyond the number of pairs is fine
    assert metrics.hardest_pairs(cm, ["a", "b", "c"], k=20) == [("c", "b", 3), ("a", "b", 2), ("b", "a", 1)]
    assert metrics.hardest_pairs(torch.eye(2, dtype=torch.long) * 5, ["a", "b"]) == []
    # a class never predicted has precision 0, one without true images recall 0 (sklearn's zero_division=0)
    report = metrics.per_class_report(metrics.confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 3),
                                      ["a", "b", "c"])
    assert report[2] == dict(cls="c", precision=0.0, recall=0.0, support=0)
    # a label outside the classes (a 10-class model scored on 3 classes) is refused, never filed in another cell
    with pytest.raises(ValueError, match=r"y_pred must be class indices in 0..2 .*got values from 1 to 5"):
        metrics.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([5, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"y_true must be class indices in 0..2"):
        metrics.confusion_matrix(torch.tensor([0, -1, 2]), torch.tensor([0, 1, 2]), 3)


class FeatureModel(nn.Module):
    """features(x) = the first two pixels of channel 0; logits = the first 3 pixels."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def features(self, x):
        return x[:, 0, 0, :2] * 10  # points() stores coordinates / 10, so that they are valid images

    def forward(self, x):
        return x[:, 0, 0, :3]


def test_confusion_matrix_takes_uint8_labels_of_many_classes():
    y_true, y_pred = torch.tensor([99, 50, 3], dtype=torch.uint8), torch.tensor([99, 50, 4])
    cm = metrics.confusion_matrix(y_true, y_pred, 100)  # 99 * 100 wrapped around in uint8
    assert cm[99, 99] == cm[50, 50] == cm[3, 4] == 1 and cm.sum() == 3


def points(xy):
    x = torch.zeros(len(xy), 1, 32, 32)
    x[:, 0, 0, :2] = torch.tensor(xy, dtype=torch.float32) / 10  # images in [0, 1]
    return x


def test_quality_metrics_by_hand():
    fm = FeatureModel()
    assert torch.allclose(metrics.normalized_activation(torch.tensor([2.0, 3.0]), torch.tensor([[1.0, 6.0], [4.0, 2.0]])),
                          torch.tensor([0.5, 0.5]))
    # a unit no real image activates has no ratio: a worse activation must not score higher
    ratio = metrics.normalized_activation(torch.tensor([-3.0, -1.0, 1.0]), torch.tensor([[-2.0, 0.0, 2.0]]))
    assert ratio[:2].isnan().all() and ratio[2] == 0.5
    # real activations of one unit only, or not one column per visualization: named, not broadcast
    for real in (torch.tensor([1.0, 6.0]), torch.ones(2, 3), torch.ones(0, 2)):
        with pytest.raises(ValueError, match=r"vis_act \(N,\) and real_acts \(M, N\)"):
            metrics.normalized_activation(torch.tensor([2.0, 3.0]), real)
    logits = torch.zeros(4, 1, 32, 32)
    logits[:, 0, 0, :3] = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert metrics.transferability(fm, logits, torch.tensor([0, 1, 2, 2])) == 0.75
    # a class-1 training point beside class 0's visualization (0.05 away): another class's, not counted
    train, train_y = torch.tensor([[0, 0], [0, 0.2], [5, 5], [0.35, 0]]), torch.tensor([0, 0, 1, 1])
    held, held_y = torch.tensor([[0.1, 0], [5, 5.5]]), torch.tensor([0, 1])
    vis, vis_y = torch.tensor([[0.3, 0.0], [5, 6]]), torch.tensor([0, 1])
    # k=1: class 0 vis at distance 0.3 vs held-out 0.1 -> 3; class 1: 1.0 vs 0.5 -> 2; mean 2.5
    assert metrics.knn_ratio(vis, vis_y, train, train_y, held, held_y, k=1) == pytest.approx(2.5)
    imgs = points([[0, 0], [3, 4], [1, 1], [1, 2]])
    assert metrics.diversity(fm, imgs, [0, 0, 1, 1]) == pytest.approx((5 + 1) / 2)
    t = torch.rand(3, 3, 32, 32)
    r = metrics.template_recovery(torch.cat([t, 1 - t[:1]]), t)
    ref = torch.corrcoef(torch.cat([t, 1 - t[:1], t]).flatten(1))[:4, 4:]
    assert torch.allclose(r, ref, atol=1e-5)
    assert torch.allclose(r.diagonal()[:3], torch.ones(3)) and r[3, 0] == pytest.approx(-1, abs=1e-5)


def test_metrics_degrade_gracefully_on_small_inputs():
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("small", image_size=32)).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert metrics.diversity(model, x[:3], y[:3]) != metrics.diversity(model, x[:3], y[:3])  # nan: no pairs
    ex = fv.exemplars(model, x, fv.Class(0), k=10)  # k larger than the set
    assert len(ex.top) == 6 and sorted(ex.top.tolist()) == list(range(6))
    # class 2 has no held-out images: its visualizations are skipped, not nan
    vis, held = (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for n, s in ((6, 1), (2, 2)))
    p = metrics.naturalness(model, vis, y, x, y, held, y[:2])
    without = metrics.naturalness(model, vis[y != 2], y[y != 2], x, y, held, y[:2])
    assert math.isfinite(p) and p == pytest.approx(without)


def test_two_choice_by_hand_and_at_chance_for_random_references():
    top, bottom = torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([[0.0, 1.0], [0.2, 0.8]])
    assert metrics.two_choice(torch.tensor([[1.0, 0.1]]), top, bottom) == 1.0
    assert metrics.two_choice(torch.tensor([[0.1, 1.0]]), top, bottom) == 0.0
    assert metrics.two_choice(torch.ones(1, 2), torch.zeros(2, 2), torch.zeros(2, 2)) == 0.5  # ties: no choice
    # random references (isotropic) cannot tell the top images from the weakest: 50% on average
    gen = torch.Generator().manual_seed(0)
    scores = [metrics.two_choice(torch.randn(1, 16, generator=gen), torch.randn(10, 16, generator=gen) + 1,
                                 torch.randn(10, 16, generator=gen)) for _ in range(1000)]
    assert abs(sum(scores) / len(scores) - 0.5) < 0.03


def test_two_choice_is_a_cosine_whatever_the_scale_of_each_reference():
    gen = torch.Generator().manual_seed(0)
    refs, top, bottom = (torch.randn(n, 8, generator=gen) for n in (5, 60, 60))
    scales = torch.logspace(-2, 2, 5)[:, None]  # one reference 100x longer than another: no louder
    assert metrics.two_choice(refs * scales, top, bottom) == metrics.two_choice(refs, top, bottom)
    # nor a longer query: a short top image at a better angle beats a long bottom one at a worse angle
    query_scales = torch.logspace(-2, 2, 60)[:, None]
    assert metrics.two_choice(refs, top * query_scales, bottom * query_scales.flip(0)) == \
        metrics.two_choice(refs, top, bottom)
    short_top, long_bottom = torch.tensor([[0.1, 0.0]]), torch.tensor([[10.0, 5.0]])
    assert metrics.two_choice(torch.tensor([[1.0, 0.0]]), short_top, long_bottom) == 1.0


def test_path_percentiles_are_centred_on_the_random_images():
    """A constant added to every activation (a bias, as a ReLU layer's are non-negative) changes nothing."""
    gen = torch.Generator().manual_seed(0)
    vis, top, random = (torch.randn(n, 6, generator=gen) for n in (8, 10, 100))
    top = top + 1.0  # the unit's images lie along (1, ..., 1) from the random ones
    offset = torch.full((6,), 20.0)
    assert torch.equal(metrics.path_percentiles([vis + offset], [top + offset], [random + offset]),
                       metrics.path_percentiles([vis], [top], [random]))


def test_path_percentiles_by_hand():
    random = [torch.randn(200, 4, generator=torch.Generator().manual_seed(0))]
    top = [torch.tensor([[3.0, 0, 0, 0], [2.0, 0, 0, 0]])]  # the unit's natural images lie along +x
    vis = [torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0], [0, 5.0, 0, 0]])]
    p = metrics.path_percentiles(vis, top, random)
    assert p.shape == (3, 1)
    assert p[0, 0] == 1.0 and p[1, 0] == 0.0 and 0.3 < p[2, 0] < 0.7  # along, against, across the path
    with pytest.raises(ValueError, match="one entry per block each; got 1, 1 and 2"):
        metrics.path_percentiles(vis, top, random * 2)  # a block more of random images: not silently dropped


def test_a_block_without_a_direction_flags_nothing_and_ties_share_the_least_similar_block():
    random = [torch.randn(50, 4, generator=torch.Generator().manual_seed(0))]
    top = [random[0][:10] - random[0][:10].mean(0) + random[0].mean(0)]  # their mean is the random images'
    assert metrics.path_percentiles([torch.randn(3, 4)], top, random).isnan().all()  # not 0: flagged before
    # three images each at 0 at both of blocks 1 and 2, one at 0 at block 2 only: block 2 (block 1 went first)
    lowest = torch.tensor([[False, True, True]] * 3 + [[False, False, True]])
    assert metrics.least_similar(lowest) == 2
    assert metrics.least_similar(torch.tensor([[True, False], [False, True], [True, False]])) == 0
    assert metrics.least_similar(torch.zeros(3, 2, dtype=torch.bool)) is None  # no block has a direction
    assert metrics.format_table([dict(technique="t", least_similar=None)]).endswith("| t | - |")


def test_diversity_of_many_copies_is_zero():
    f = (torch.randn(1, 512, generator=torch.Generator().manual_seed(1)) * 5 + 3).expand(40, -1).contiguous()
    # past 25 images cdist takes a matrix product, whose distance from a copy to itself was 0.08, not 0
    assert metrics.feature_diversity(f, torch.zeros(40, dtype=torch.long)) == 0


def test_block_layers_and_channel_sample():
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("small", image_size=32)).eval()
    assert models.block_layers(model) == ["whiten", "whiten_act", "block1.act2", "block2.act2", "block3.act2"]
    sample = metrics.channel_sample(model, per_block=2)
    assert [t.layer for t in sample] == [l for l in models.block_layers(model) for _ in range(2)]
    assert sample == metrics.channel_sample(model, per_block=2) != metrics.channel_sample(model, per_block=2, seed=1)
    stats = metrics.block_activations(model, torch.rand(3, 3, 32, 32), metrics.spatial_statistics)
    assert [s.shape[1] for s in stats] == [2 * models.layer_channels(model, l) for l in models.block_layers(model)]


def test_naturalness_is_finite_for_a_model_whose_last_block_is_one_pixel():
    import torchvision
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()  # layer4 is 1 x 1 at 32 px
    a = torch.rand(4, 8, 1, 1)
    assert torch.equal(metrics.spatial_statistics(a), torch.cat([a.flatten(1), torch.zeros(4, 8)], 1))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 3, 32, 32, generator=gen), torch.arange(20) % 10
    score = metrics.naturalness(resnet, x[:10], y[:10], x, y, torch.rand(10, 3, 32, 32, generator=gen), y[:10])
    assert math.isfinite(score)


def test_shuffled_pixels_keep_each_images_colours_and_move_its_pixels():
    x = torch.rand(2, 3, 8, 8)
    s = metrics._shuffled(x, seed=0)
    assert torch.equal(s.flatten(2).sort(2).values, x.flatten(2).sort(2).values)  # the same values per channel
    assert not torch.equal(s, x)
    pixels = lambda im: set(map(tuple, im.flatten(1).T.tolist()))  # noqa: E731 (RGB triples, kept together)
    assert pixels(s[0]) == pixels(x[0])


# ----------------------------------------------------------------------------- where the metrics must fail

@pytest.fixture(scope="module")
def table(cifar10_jpeg, tmp_path_factory):
    """The quality table on the CIFAR-10 copy: two small classifiers (1 epoch each: 61% and 65% test
    accuracy), 3 seeds, unregularized pixel ascent as the technique; also the Data and the models."""
    _, d = cifar10_jpeg
    ckpt = tmp_path_factory.mktemp("metrics")
    kw = dict(preset="small", hyp=dict(epochs=1, batch_size=256), device="cpu", progress=False)
    model, _ = training.train_classifier(d, ckpt / "a.pt", seed=0, **kw)
    other, _ = training.train_classifier(d, ckpt / "b.pt", seed=1, widths=(24, 48, 48), **kw)
    rows, _ = metrics.quality_table(model, other, d, {"pixel": fv.get_technique("pixel")}, seeds=3, steps=64,
                                    n_ref=5000, progress=False)
    print("\n" + metrics.format_table(rows))
    return {r["technique"]: r for r in rows}, d, other


def margin(rows, metric, good, bad, higher_is_worse):
    """(how much worse `bad` scores than `good`, the seed-to-seed spread of that difference)."""
    sign = 1 if higher_is_worse else -1
    diff = sign * (rows[bad][metric] - rows[good][metric])
    return diff, (rows[bad][metric + "_sd"] ** 2 + rows[good][metric + "_sd"] ** 2) ** 0.5


KNOWN_BAD = ["pixel", "shuffled pixels", "uniform noise", "another class"]


@pytest.mark.parametrize("bad", KNOWN_BAD)
@pytest.mark.parametrize("metric, real", [("naturalness", "real test images"), ("path_flagged", "dataset exemplars")])
def test_naturalness_metrics_rank_real_images_above_every_known_bad_input(table, metric, real, bad):
    rows, _, _ = table
    diff, spread = margin(rows, metric, real, bad, higher_is_worse=True)
    assert diff > spread, (metric, bad, rows[real][metric], rows[bad][metric], spread)


# pixel ascent excites its class beyond any real image (its act is high): the one way it is not bad
@pytest.mark.parametrize("metric, bad", [(m, b) for m in ("act", "transfer") for b in KNOWN_BAD
                                         if (m, b) != ("act", "pixel")])
def test_class_evidence_metrics_score_noise_and_other_classes_low(table, metric, bad):
    rows, _, _ = table
    diff, spread = margin(rows, metric, "real test images", bad, higher_is_worse=False)
    assert diff > spread, (metric, bad, rows["real test images"][metric], rows[bad][metric], spread)


def test_two_choice_tells_exemplars_from_random_references(table):
    rows, _, _ = table
    # real test images are random references for a channel, and its exemplars do better. Random references need not
    # score 0.5: a channel's top and weakest images are not equally like a random one (0.29 on models trained in
    # float32, on a CPU without bfloat16 units, its references leaning to the weakest), so 0.5 is no bound to assert
    diff, spread = margin(rows, "two_choice_channels", "dataset exemplars", "real test images", higher_is_worse=False)
    assert diff > spread
    for bad in ("uniform noise", "shuffled pixels"):
        for metric in ("two_choice", "two_choice_channels"):
            diff, spread = margin(rows, metric, "dataset exemplars", bad, higher_is_worse=False)
            assert diff > spread, (bad, metric)
    for bad in ("pixel", "another class"):  # the classes' (another class has no channel images)
        diff, spread = margin(rows, "two_choice", "dataset exemplars", bad, higher_is_worse=False)
        assert diff > spread, bad


def test_diversity_is_zero_for_copies_and_high_for_real_images_of_a_class(table):
    _, d, other = table
    real = d.test_x[d.test_y == 3][:6]
    copies = real[:1].expand(6, -1, -1, -1)
    groups = torch.zeros(6, dtype=torch.long)
    assert metrics.diversity(other, copies, groups) < 1e-3
    noise = torch.randint(-1, 2, copies.shape, generator=torch.Generator().manual_seed(0))  # +-1 grey level
    nearly = (copies.float() + noise).clamp(0, 255).to(torch.uint8)
    # measured: 11.8 for six real images of a class, 1.19 for the nearly identical copies
    assert metrics.diversity(other, real, groups) > 5 * metrics.diversity(other, nearly, groups)


# ----------------------------------------------------------------------------- the harder synthetic set

@pytest.fixture(scope="module")
def hard():
    import data
    d = data.load_data("synthetic-hard", n_train=2000, n_test=1000)
    return d, metrics.PlantedDetector(d.train_x)


def test_planted_detector_finds_each_feature_wherever_and_however_large_it_is(hard):
    import data
    _, detector = hard
    gen = torch.Generator().manual_seed(0)
    for k, feature in enumerate(data.HARD_FEATURES):  # a clean patch on grey, at random places and scales
        x = (0.5 + data.gabor_patches([feature] * 20, 32, gen, amplitude=0.3)).clamp(0, 1)
        assert (detector(x) == k).all(), (k, detector(x))


def test_planted_detector_on_real_samples_and_where_it_must_fail(hard):
    d, detector = hard
    acc = (detector(d.test_x) == d.test_y).float().mean().item()
    flipped = (detector(d.test_x.flip(-1)) == d.test_y).float().mean().item()  # a flip keeps every class
    shuffled = (detector(metrics._shuffled(d.test_x, 0)) == d.test_y).float().mean().item()
    noise = (detector(torch.rand(1000, 3, 32, 32)) == d.test_y).float().mean().item()
    assert acc > 0.9 and flipped > 0.9, (acc, flipped)
    assert shuffled < 0.25 and noise < 0.25, (shuffled, noise)
    flat = torch.full((10, 3, 32, 32), 0.5) + torch.linspace(-0.4, 0.4, 10)[:, None, None, None]  # grey to white
    assert (detector(flat) == -1).all()  # no class, not one class every time (right for 1 in 10)
    with pytest.raises(ValueError, match="images must be 32x32, the side of the training images"):
        detector(torch.rand(2, 3, 28, 28))


def test_rank_techniques_orders_by_both_naturalness_metrics_among_those_with_class_evidence():
    row = lambda name, nat, path, act=2.0, transfer=1.0: dict(technique=name, naturalness=nat, path_flagged=path,
                                                              act=act, transfer=transfer)
    rows = [row("real test images", 0.9, 0.3),          # not a technique: never ranked
            row("a", 1.2, 0.6), row("b", 1.5, 0.4), row("c", 2.0, 0.5),
            row("weak", 1.0, 0.2, act=0.5),                # most natural, but does not excite its unit
            row("foreign", 1.0, 0.2, transfer=0.4)]        # another model disagrees
    ranked = [r["technique"] for r in metrics.rank_techniques(rows, ["a", "b", "c", "weak", "foreign"])]
    assert ranked == ["b", "a", "c"]  # rank sums 1, 2, 3
    assert [r["technique"] for r in metrics.rank_techniques(rows + [row("a+b", 0.5, 0.1)], "a+b")] == ["a+b"]  # not "a"


def test_rank_techniques_does_not_reward_images_closer_to_the_training_set_than_real_ones():
    row = lambda name, nat, path: dict(technique=name, naturalness=nat, path_flagged=path, act=2.0, transfer=1.0)
    rows = [row("copies", 0.4, 0.4), row("b", 1.5, 0.4), row("exact copies", 0.0, 0.1)]
    # |log 0.4| = 0.92 is farther from a real image than |log 1.5| = 0.41; a distance of 0 is the farthest
    assert [r["technique"] for r in metrics.rank_techniques(rows, ["copies", "b"])] == ["b", "copies"]
    assert [r["technique"] for r in metrics.rank_techniques(rows, ["copies", "exact copies"])] == ["copies", "exact copies"]


def test_template_recovery_fails_for_noise_shuffled_pixels_and_constant_images():
    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 3, 32, 32, generator=gen)
    labels = torch.arange(10).repeat(20)
    noisy = (templates[labels] + 0.5 * torch.rand(200, 3, 32, 32, generator=gen)).clamp(0, 1) / 1.5
    assert metrics.recovered(metrics.template_recovery(noisy, templates), labels) == 1.0
    noise = torch.rand(200, 3, 32, 32, generator=gen)
    shuffled = metrics._shuffled(noisy, seed=0)
    for bad in (noise, shuffled):
        assert metrics.recovered(metrics.template_recovery(bad, templates), labels) < 0.2
    constant = torch.full((10, 3, 32, 32), 0.5)  # correlates with nothing: used to recover class 0
    r = metrics.template_recovery(constant, templates)
    assert r.isnan().all() and metrics.recovered(r, torch.zeros(10, dtype=torch.long)) == 0.0
    with pytest.raises(ValueError, match=r"must be a batch \(B, C, H, W\).*pass images\[None\]"):
        metrics.template_recovery(templates[0], templates)


def test_degenerate_statistics_are_named_not_nan():
    model = models.build_model(models.cnn_config("small", image_size=32)).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="train_x must hold at least 2 images to standardize on; got 1"):
        metrics.Statistics(model, x[:1])
    dead = models.build_model(models.cnn_config("small", image_size=32)).eval()
    with torch.no_grad():
        for p in dead.parameters():
            p.zero_()  # every block's statistics the same for every image
    with pytest.raises(ValueError, match=r"block '.*' of CNN gives the same statistics for every training image"):
        metrics.Statistics(dead, x)
    f, y = torch.rand(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        metrics.knn_ratio(f, y, f, y, f + 1, y, k=0)


def test_rank_techniques_leaves_out_a_technique_whose_scores_are_not_numbers():
    row = lambda name, nat, path: dict(technique=name, naturalness=nat, path_flagged=path, act=2.0, transfer=1.0)
    rows = [row("a", 1.0, 0.3), row("b", 2.0, 0.1), row("nan", float("nan"), 0.2)]  # NaN would rank first
    assert [r["technique"] for r in metrics.rank_techniques(rows, ["a", "b", "nan"])] == ["a", "b"]


def test_rank_techniques_gives_equal_values_one_rank_whatever_the_order_of_the_rows():
    row = lambda name, nat, path: dict(technique=name, naturalness=nat, path_flagged=path, act=2.0, transfer=1.0)
    rows = [row("a", 1.0, 0.5), row("b", 2.0, 0.5), row("c", 3.0, 0.4)]  # a and b tie on the path check
    for order in itertools.permutations(rows):
        # rank sums a 0 + 1.5, b 1 + 1.5, c 2 + 0: c before b in any order of the rows
        assert [r["technique"] for r in metrics.rank_techniques(list(order), list("abc"))] == ["a", "c", "b"]
    tied = [row("d", 1.0, 0.6), row("e", 1.0, 0.5)]  # as natural as d, and better on the path check
    assert [r["technique"] for r in metrics.rank_techniques(tied, list("de"))] == ["e", "d"]
    crossed = [row("f", 2.0, 0.1), row("g", 1.0, 0.2)]  # equal rank sums (1 + 0, 0 + 1): the more natural first
    for order in (crossed, crossed[::-1]):
        assert [r["technique"] for r in metrics.rank_techniques(order, list("fg"))] == ["g", "f"]


def test_rank_techniques_ties_values_within_their_seed_spread():
    """The notebook's table of one CIFAR-10 run (naturalness, path flagged, each mean ± SD over 4 seeds): ranked on
    the means alone, pixel+reg (naturalness 7.96) came before fourier (1.85) by path checks 0.03 apart, within
    their spread; ties of that kind share a rank."""
    table = {"pixel+reg": (7.96, 0.08, 0.40, 0.04), "fourier": (1.85, 0.07, 0.43, 0.06),
             "maco": (1.31, 0.02, 0.36, 0.05), "latent": (1.79, 0.04, 0.35, 0.07),
             "whitened": (1.70, 0.12, 0.41, 0.02), "hybrid": (1.90, 0.09, 0.43, 0.05)}
    rows = [dict(technique=name, naturalness=n, naturalness_sd=n_sd, path_flagged=p, path_flagged_sd=p_sd, act=2.0,
                 transfer=1.0) for name, (n, n_sd, p, p_sd) in table.items()]
    assert [r["technique"] for r in metrics.rank_techniques(rows, list(table))] == [
        "maco", "whitened", "latent", "fourier", "hybrid", "pixel+reg"]
    means = [{k: v for k, v in r.items() if not k.endswith("_sd")} for r in rows]  # no spread: as before
    assert [r["technique"] for r in metrics.rank_techniques(means, list(table))] == [
        "maco", "latent", "whitened", "pixel+reg", "fourier", "hybrid"]
    one_seed = [dict(r, naturalness_sd=float("nan"), path_flagged_sd=float("nan")) for r in rows]  # NaN: no spread
    assert [r["technique"] for r in metrics.rank_techniques(one_seed, list(table))] == [
        r["technique"] for r in metrics.rank_techniques(means, list(table))]


def test_tied_ranks_are_groups_of_neighbours_within_their_spread():
    # a spread that reaches its neighbour ties the two: the noisy better mean is never ranked behind it
    assert metrics._tied_ranks([(0.0, 1.0), (0.1, 0.0), (0.5, 0.0), (0.9, 0.0)]) == [0.5, 0.5, 2.0, 3.0]
    assert metrics._tied_ranks([(0.2, 0.08), (0.0, 0.08), (0.1, 0.08)]) == [1.0, 1.0, 1.0]  # a chain: one group
    assert metrics._tied_ranks([(2.0, 0.0), (1.0, 0.0), (2.0, 0.0)]) == [1.5, 0.0, 1.5]  # no spread: equal values
    assert metrics._tied_ranks([(math.inf, 0.0), (1.0, math.inf), (0.0, 0.0)]) == [1.0] * 3  # an inf spread: both sides
    assert metrics._tied_ranks([]) == []


def test_rank_techniques_takes_class_evidence_at_its_bounds():
    row = lambda name, act, transfer: dict(technique=name, naturalness=1.0, path_flagged=0.5, act=act, transfer=transfer)
    rows = [row("at both", 1.01, 0.9), row("act at 1", 1.0, 1.0), row("transfer under", 2.0, 0.89)]
    # an activation of exactly 1 is that of the class's top test image: returning it is no visualization
    assert [r["technique"] for r in metrics.rank_techniques(rows, [r["technique"] for r in rows])] == ["at both"]


def test_features_of_torchvision_classifiers_are_what_their_head_reads():
    import torchvision
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model in (torchvision.models.resnet18(num_classes=10), torchvision.models.vgg11(num_classes=10)):
        model.eval()
        head = model.fc if hasattr(model, "fc") else model.classifier[-1]
        f = metrics.features(model, x)
        assert f.shape == (4, head.in_features)
        with torch.no_grad():
            torch.testing.assert_close(head(f), model(x), atol=1e-5, rtol=1e-4)  # vgg's .features was unpooled maps
    # a `features` submodule that flattens its maps is a part, not the penultimate features: a hidden layer follows
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten())
    mlp_head = nn.Sequential(nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))
    model = nn.Sequential(collections.OrderedDict(features=flat, classifier=mlp_head)).eval()
    assert metrics.features(model, x).shape == (4, 16)
    cnn = models.build_model(models.cnn_config("small"))
    with torch.no_grad():
        torch.testing.assert_close(metrics.features(cnn, x), cnn.eval().features(x))
    with pytest.raises(ValueError, match=r"cannot tell the features of Sequential: no nn.Linear head runs in it"):
        metrics.features(nn.Sequential(nn.Conv2d(3, 4, 3)), x)
    # a fully convolutional classifier: its `features` submodule is not read as the features, and the error
    # says what to do (its last 1x1 convolution is no sure head: a ResNet-50's with fc = nn.Identity() is not)
    with pytest.raises(ValueError, match=r"SqueezeNet: no nn.Linear head runs in it.*not a submodule.*wrap it"):
        metrics.features(torchvision.models.squeezenet1_1(num_classes=10).eval(), x)

    class TupleFeatures(nn.Module):  # a features() method of another kind falls through to the head's input
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

        def features(self, x):
            return x, x

        def forward(self, x):
            return self.net(x)
    assert metrics.features(TupleFeatures().eval(), x).shape == (4, 4 * 8 * 8)


def test_metrics_refuse_labels_that_do_not_match_the_images():
    fm, x = FeatureModel(), points([[1, 2], [3, 4], [5, 6]])
    with pytest.raises(ValueError, match=r"labels must be \(3,\) integer class indices, one per .* \(3, 1\)"):
        metrics.transferability(fm, x, torch.tensor([[2], [2], [2]]))  # used to broadcast to a 3 x 3 comparison
    with pytest.raises(ValueError, match=r"labels must be \(3,\).*of shape \(1,\)"):
        metrics.transferability(fm, x, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"labels must be \(3,\) integer class indices"):
        metrics.transferability(fm, x, torch.tensor([0.5, 1.0, 2.0]))  # used to score 0.0
    with pytest.raises(ValueError, match=r"y_true and y_pred must be \(N,\).*shapes \(4,\) and \(1,\)"):
        metrics.confusion_matrix(torch.tensor([0, 1, 2, 1]), torch.tensor([1]), 3)
    with pytest.raises(ValueError, match=r"two_choice needs references"):
        metrics.two_choice(torch.zeros(0, 5), torch.rand(3, 5), torch.rand(3, 5))  # was 0.0: worse than chance
    with pytest.raises(ValueError, match=r"labels must be class indices in 0..2 .*from 1 to 3"):
        metrics.transferability(fm, x, torch.tensor([1, 3, 2]))  # class 3 of a 3-class model: was a miss
    f, y = torch.rand(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"held-out points of class 0 lie on training points"):
        metrics.knn_ratio(torch.rand(2, 4), y[:2], f, y, f, y, k=1)  # was inf
    f, y = torch.rand(30, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(30, dtype=torch.long)
    with pytest.raises(ValueError, match=r"held-out points of class 0 lie on training points"):
        metrics.knn_ratio(torch.rand(2, 4), y[:2], f, y, f, y, k=1)  # over 25 points cdist rounds: not exactly 0
    with pytest.raises(ValueError, match=r"held-out points of class 0 lie on training points"):
        metrics.knn_ratio(torch.rand(2, 4), y[:2], torch.full((30, 4), 0.7), y, torch.full((30, 4), 0.7), y)  # constant


class _HeadThenSqueeze(nn.Module):
    """A head registered before a squeeze-excitation block of linear layers, and an auxiliary head that
    runs only in training: the head's input is still what the last linear layer to run reads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.se = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
        self.aux = nn.Linear(16, 10)

    def forward(self, x):
        a = self.conv(x)
        a = a * self.se(a.mean((2, 3)))[:, :, None, None]
        return self.fc(a.mean((2, 3)))


def test_features_are_the_input_of_the_last_linear_layer_to_run():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = _HeadThenSqueeze().eval()
    f = metrics.features(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(f), model(x))
    fm = FeatureModel()  # a features() method that gives (N, D) wins
    assert torch.equal(metrics.features(fm, points([[1, 2]])), torch.tensor([[1.0, 2.0]]))


def test_naturalness_weighs_every_block_the_same():
    """Each block's standardized statistics have a mean squared norm of about 1 over the training images,
    whatever its width: the widest block does not decide the distances alone."""
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("small", image_size=32)).eval()
    train = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stats = metrics.Statistics(model, train)
    widths = [2 * models.layer_channels(model, layer) for layer in stats.layers]  # a mean and a std per channel
    assert len(set(widths)) > 1 and sum(widths) == stats.train.shape[1]
    norms = [block.pow(2).sum(1).mean().item() for block in stats.train.split(widths, 1)]
    assert norms == pytest.approx([63 / 64] * len(widths), rel=0.05), norms


@pytest.fixture(scope="module")
def reference():
    d = data.load_data("synthetic", n_train=600, n_test=100, seed=0)
    torch.manual_seed(0)
    model, other = (models.build_model(models.cnn_config("small", image_size=32)).eval() for _ in range(2))
    return metrics.Reference(model, other, d, metrics.channel_sample(model, per_block=1), n_ref=500, n_random=50)


def test_a_class_no_test_image_excites_is_left_out_of_the_activation(reference, monkeypatch):
    real = reference.real.clone()
    real[:, 0] = -1.0  # no test image gives class 0 a positive logit: no ratio to it
    monkeypatch.setattr(reference, "real", real)
    images = reference.test_x[:len(reference.classes)]
    acts = fv.activations(reference.model, images, reference.classes).diagonal()
    expected = (acts[1:] / real[:, 1:len(acts)].max(0).values).mean().item()
    assert reference.score(images)["act"] == pytest.approx(expected)  # NaN before: the row left out of the ranking


def test_block_statistics_of_a_bfloat16_model_are_reduced_in_float32(reference):
    model = copy.deepcopy(reference.model).to(torch.bfloat16)
    images = reference.test_x[:4]
    seen = []
    metrics.block_activations(model, images, lambda a: seen.append(a.dtype) or a.mean((2, 3)), reference.layers[:1])
    assert seen == [torch.float32]  # the mean and SD of a map rounded to bfloat16 were 0.4% off


def test_block_statistics_run_the_whole_model_for_the_first_batch_only():
    """One Recorder reads every batch: it learns the model on the first (a pass, and another where an output is
    overwritten in place, as by DenseNet's functional ReLU), and stops the later ones after the last block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    heads = []
    model[-1].register_forward_hook(lambda *a: heads.append(1))
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = metrics.block_activations(model, images, metrics.pooled, ["0", "2"], batch_size=2)  # overwritten in place
    assert len(heads) == 2  # 4 batches: 8 whole passes when each batch learned the model anew
    with torch.no_grad():
        first = model[0](images)
    assert torch.allclose(a[0], metrics.pooled(first), atol=1e-6)  # before its ReLU wrote over it


def test_the_path_check_flags_an_image_unlike_the_natural_ones_at_a_single_block(reference, monkeypatch):
    n = len(reference.layers)
    p = torch.ones(2, n)
    # the first image fails at block 2 only; the second, at the threshold, passes, least at block 2
    p[:, 2] = torch.tensor([0.1, metrics.PATH_THRESHOLD])
    calls = []
    monkeypatch.setattr(metrics, "path_percentiles", lambda a_vis, a_top, a_random: (
        calls.append((a_vis, a_top, a_random)), p)[1])
    images = reference.test_x[:2]
    flagged, least = reference.path_check(images, torch.tensor([0, 0]))
    assert flagged == 0.5 and least == reference.layers[2]
    # compared with unit 0's path images (its top R) and the random images, block by block
    (a_vis, a_top, a_random), = calls
    a = metrics.block_activations(reference.model, images, metrics.pooled, reference.layers)
    for block in range(n):
        assert torch.equal(a_vis[block], a[block])
        assert torch.equal(a_top[block], reference.a_test[block][reference.top[0, :metrics.R]])
        assert torch.equal(a_random[block], reference.a_test[block][reference.random])
    p[:, 0] = torch.nan  # a block without a direction flags nothing and hides nothing: the first image still flagged
    assert reference.path_check(images, torch.tensor([0, 0])) == (0.5, reference.layers[2])
    p[:] = torch.nan
    assert reference.path_check(images, torch.tensor([0, 0])) == (0.0, None)


def test_two_choice_queries_are_the_units_next_top_images_apart_from_the_others(reference, monkeypatch):
    """Per unit: its top R test images set the path's direction, the next R are the two-choice queries
    (against its R weakest), the R after them the exemplars row; no image is in two of these."""
    top, bottom, R = reference.top, reference.bottom, metrics.R
    for u in range(len(reference.units)):
        groups = [set(top[u, :R].tolist()), set(top[u, R:2 * R].tolist()), set(top[u, 2 * R:].tolist()),
                  set(bottom[u].tolist())]
        assert sum(map(len, groups)) == len(set().union(*groups)) == 4 * R, u
        # top: the unit's strongest test images, strongest first; bottom: its weakest (ties in any order)
        real = reference.real[:, u]
        assert real[top[u]].tolist() == sorted(real.tolist(), reverse=True)[:3 * R], u
        assert real[bottom[u]].sort().values.tolist() == sorted(real.tolist())[:R], u
    queries = []
    two_choice = metrics.two_choice
    monkeypatch.setattr(metrics, "two_choice", lambda refs, f_top, f_bottom: (
        queries.append((refs, f_top, f_bottom)), two_choice(refs, f_top, f_bottom))[1])
    f = metrics.features(reference.other, reference.test_x[:4])
    units = torch.tensor([0, 1, 2, 1])
    reference._two_choice(f, units)
    assert len(queries) == 3  # once per unit, with that unit's images as references
    for u, (refs, f_top, f_bottom) in enumerate(queries):
        assert torch.equal(refs, f[units == u])
        assert torch.equal(f_top, reference.f_test[top[u, R:2 * R]]) and torch.equal(f_bottom, reference.f_test[bottom[u]])


def test_the_real_image_rows_never_draw_an_image_their_unit_is_compared_with(reference):
    d = SimpleNamespace(name="synthetic", classes=reference.classes, test_x=reference.test_x, test_y=reference.test_y)
    rows, units, R = metrics.baselines(d, reference), reference.units, metrics.R
    # by hand: each unit's path images and two-choice queries (its top 2R, its weakest R), the path's random images
    avoid = torch.cat([reference.top[:, :2 * R], reference.bottom, reference.random.expand(len(units), -1)], 1)
    classes = [u for u in units if isinstance(u, fv.Class)]
    checked = 0
    for seed in range(10):
        for name, targets, shift in (("real test images", units, 0), ("another class", classes, 1)):
            for t, image in zip(targets, rows[name](targets, seed)):
                i = (d.test_x == image).flatten(1).all(1).nonzero()[:, 0]
                pool = ((d.test_y == (t.idx + shift) % 10).nonzero()[:, 0] if isinstance(t, fv.Class)
                        else torch.arange(len(d.test_y)))
                if not torch.isin(pool, avoid[units.index(t)]).all():  # else every image is compared: any
                    assert not torch.isin(i, avoid[units.index(t)]).any(), (name, t, seed)
                    checked += 1
    assert checked > 100


def test_a_real_image_is_drawn_evenly_among_those_its_unit_is_not_compared_with():
    d = SimpleNamespace(name="synthetic", classes=list("ab"), test_x=torch.arange(10).view(10, 1, 1, 1),
                        test_y=torch.zeros(10, dtype=torch.long))
    avoid = [torch.arange(6)]  # a run of six: a draw that took the next image left gave image 6 seven chances in ten
    drawn = torch.cat([metrics._pick(d, [fv.Class(0)], seed, avoid) for seed in range(400)]).flatten()
    counts = torch.bincount(drawn, minlength=10)
    assert counts[:6].sum() == 0 and (counts[6:] > 60).all() and (counts[6:] < 140).all()  # 100 each, evenly


def test_the_table_gives_each_metric_its_mean_and_standard_deviation_over_the_seeds(reference, monkeypatch):
    """Each row's metric is the mean of its seeds' scores and `_sd` their standard deviation; one seed has no
    spread (NaN); only techniques are timed (the baselines' `seconds` is NaN)."""
    d = SimpleNamespace(name="synthetic", classes=reference.classes, size=32, test_x=reference.test_x,
                        test_y=reference.test_y, train_x=reference.test_x)
    calls = itertools.count()
    monkeypatch.setattr(metrics, "Reference", lambda *a, **k: reference)
    monkeypatch.setattr(reference, "score", lambda images, channel_images=None: dict(
        act=float(next(calls) % 3 + 1), least_similar="block1.act2"))  # seeds 0, 1, 2 score 1, 2, 3
    mine = lambda targets, seed: torch.rand(len(targets), 3, 32, 32)
    rows, _ = metrics.quality_table(reference.model, reference.other, d, {"mine": mine}, seeds=3, channels=[],
                                    progress=False)
    for row in rows:
        assert row["act"] == 2 and row["act_sd"] == pytest.approx(1.0), row
        assert math.isnan(row["seconds"]) != (row["technique"] == "mine")
    monkeypatch.setattr(reference, "score", lambda images, channel_images=None: dict(act=1.0, least_similar="block1.act2"))
    row, = [r for r in metrics.quality_table(reference.model, reference.other, d, {"mine": mine}, seeds=1,
                                             channels=[], progress=False)[0] if r["technique"] == "mine"]
    assert row["act"] == 1 and math.isnan(row["act_sd"])
    with pytest.warns(UserWarning, match=r"seeds=11: the dataset exemplars row has 10 images per unit .* again"):
        metrics.quality_table(reference.model, reference.other, d, {"mine": mine}, seeds=11, channels=[],
                              progress=False)


def test_the_quality_tables_planted_column_on_the_harder_set_is_the_detectors(hard):
    """On synthetic-hard the table's planted recovery is PlantedDetector's: real test images of each class recover
    their feature, uniform noise and shuffled pixels do not (untrained models: the column reads no model)."""
    d, _ = hard
    torch.manual_seed(0)
    model, other = (models.build_model(models.cnn_config("small")).eval() for _ in range(2))
    rows, _ = metrics.quality_table(model, other, d, {}, seeds=2, n_ref=200, channels=[], progress=False)
    by = {r["technique"]: r for r in rows}
    assert by["real test images"]["planted"] >= 0.9
    assert by["uniform noise"]["planted"] <= 0.3 and by["shuffled pixels"]["planted"] <= 0.3
    assert by["another class"]["planted"] <= 0.3  # the feature of the class it is, not of the one it stands for
