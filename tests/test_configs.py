"""Every shipped config composes and every component node instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from dmlrun.components import build, build_components, has_target
from dmlrun.errors import ConfigError
from tests.conftest import compose_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bases() -> dict[str, type | tuple[type, ...]]:
    """What each component group must build (a wrong _target_ fails here)."""
    import torch

    from dmlrun.data.samplers import PairSampler, PKSampler, TripletSampler
    from dmlrun.distances import Distance
    from dmlrun.losses.base import MetricLoss
    from dmlrun.miners.base import Miner
    from dmlrun.models.base import Embedder

    return {"model": Embedder, "distance": Distance, "loss": MetricLoss, "miner": Miner,
            "sampler": (PKSampler, PairSampler, TripletSampler),
            "optimizer": torch.optim.Optimizer,
            "scheduler": torch.optim.lr_scheduler.LRScheduler}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


# options that only build with a particular setting beside them
NEEDS = {"distance_weighted": ["distance.normalize=true"],
         # margin-window miners need a loss with a margin (the default's is soft)
         "semihard": ["loss=triplet"], "batch_all": ["loss=triplet"],
         # RGB backbones: an RGB dataset, and no pretrained file to read
         "resnet18": ["dataset=cub200", "model.weights=null"],
         "resnet50": ["dataset=cub200", "model.weights=null"],
         "bninception": ["dataset=cub200", "model.weights=null"]}


@pytest.mark.parametrize("group", ["model", "distance", "loss", "miner", "sampler", "optimizer",
                                   "scheduler"])
def test_every_option_instantiates(group):
    import torch

    names = options(group)
    assert names, f"no options in configs/{group}"
    for name in names:
        cfg = compose_cfg([f"{group}={name}", *NEEDS.get(name, [])])
        node = cfg[group]
        if not has_target(node):  # no component, or a per-step schedule the loop applies
            assert name == "none" or (group == "scheduler" and "anneal" in node), name
            continue
        obj = instantiate(node)
        if group == "optimizer":
            obj = obj(params=[torch.nn.Parameter(torch.zeros(1))])
        if group == "scheduler":
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            obj = obj(opt)
        assert isinstance(obj, _bases()[group]), (group, name, type(obj))


def test_models_embed_raw_images():
    import torch

    for name in options("model"):
        cfg = compose_cfg([f"model={name}", "model.embedding_dim=5", *NEEDS.get(name, [])])
        size = 28 if cfg.model.get("image_size") in (None, 28) else 32
        channels = cfg.model.get("in_channels", cfg.dataset.channels)
        out = instantiate(cfg.model)(torch.rand(3, channels, size, size))
        assert out.shape == (3, 5)


def test_convnet_batch_norm_is_an_option_that_leaves_the_plain_net_as_it_was():
    import torch

    from dmlrun.models.convnet import ConvNet

    plain = ConvNet(embedding_dim=4)
    # the plain net's parameter names, so its old checkpoints load
    assert list(plain.state_dict()) == [
        "mean", "std", "features.0.weight", "features.0.bias", "features.1.weight",
        "features.3.weight", "features.3.bias", "features.4.weight", "head.1.weight", "head.1.bias",
        "head.2.weight", "head.3.weight", "head.3.bias", "head.4.weight", "head.5.weight",
        "head.5.bias"]
    normed = ConvNet(embedding_dim=4, batch_norm=True).train()
    norms = [m for m in normed.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 4  # after both convs and both hidden linear layers
    layers = [m for m in normed.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert [m.bias is None for m in layers] == [True, True, True, True, False]
    x = torch.rand(8, 1, 28, 28)
    assert normed(x).shape == (8, 4)
    normed.eval()
    one = normed(x[:1])  # evaluation uses the running statistics: a batch of one works
    assert torch.allclose(one, normed(x)[:1], atol=1e-5)


def test_convnet_dropout_drops_before_the_embedding_layer_in_training_only():
    import torch

    from dmlrun.models.convnet import ConvNet

    torch.manual_seed(0)
    net = ConvNet(embedding_dim=4, batch_norm=True, pool_first=True, dropout=0.5)
    drops = [i for i, m in enumerate(net.head) if isinstance(m, torch.nn.Dropout)]
    assert drops == [len(net.head) - 2] and isinstance(net.head[-1], torch.nn.Linear)
    assert net.head[drops[0]].p == 0.5
    x = torch.rand(16, 1, 28, 28)
    net.train()
    # the last hidden layer's output, half of it zeroed (and the rest doubled) in training
    hidden = net.head[:-2](net.features((x - net.mean) / net.std))
    dropped = net.head[-2](hidden)
    zeroed = (dropped == 0) & (hidden != 0)
    assert 0.3 < zeroed.float().mean() < 0.7
    assert torch.allclose(dropped[~zeroed], 2 * hidden[~zeroed])
    net.eval()  # no dropout in evaluation: deterministic
    assert torch.equal(net(x), net(x))
    with pytest.raises(ConfigError, match=r"model=convnet_bn .*dropout=1.0 must be in \[0, 1\)"):
        build(compose_cfg(["model.dropout=1.0"]).model, "model=convnet_bn")


@pytest.mark.parametrize("batch_norm", [False, True])
def test_convnet_pool_first_is_the_same_function_while_prelu_slopes_are_non_negative(
        batch_norm: bool):
    import torch

    from dmlrun.models.convnet import ConvNet

    torch.manual_seed(0)
    plain = ConvNet(embedding_dim=3, batch_norm=batch_norm).eval()
    swapped = ConvNet(embedding_dim=3, batch_norm=batch_norm, pool_first=True).eval()
    for m in plain.features:
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.fill_(0.3)
    # same modules with each conv block's PReLU and MaxPool swapped: move the slopes across
    prelu_at = [i for i, m in enumerate(plain.features) if isinstance(m, torch.nn.PReLU)]
    swapped_at = [i for i, m in enumerate(swapped.features) if isinstance(m, torch.nn.PReLU)]
    assert [j - i for i, j in zip(prelu_at, swapped_at, strict=True)] == [1, 1]
    state = dict(plain.state_dict())
    for i, j in zip(prelu_at, swapped_at, strict=True):
        state[f"features.{j}.weight"] = state.pop(f"features.{i}.weight")
    swapped.load_state_dict(state)
    x = torch.rand(6, 1, 28, 28)
    assert torch.allclose(plain(x), swapped(x), atol=1e-5)
    plain.features[prelu_at[0]].weight.data.fill_(-0.5)  # a negative slope: not the same
    swapped.features[swapped_at[0]].weight.data.fill_(-0.5)
    assert not torch.allclose(plain(x), swapped(x), atol=1e-3)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_convnet_evaluates_pooling_first_bit_identically(batch_norm: bool) -> None:
    """The plain order pools before each PReLU in eval mode while the slopes are >= 0:
    exactly the outputs of the modules in their built order; not in training, nor with
    a negative slope."""
    import torch

    from dmlrun.models.convnet import ConvNet

    torch.manual_seed(0)
    net = ConvNet(embedding_dim=5, batch_norm=batch_norm)
    x = torch.rand(32, 1, 28, 28)
    net.train()(x)  # BatchNorm running statistics
    net.eval()

    def built_order() -> torch.Tensor:
        return net.head(net.features((x - net.mean) / net.std))

    assert net._pool_first_now() and torch.equal(net(x), built_order())
    assert not net.train()._pool_first_now()
    prelu = next(m for m in net.eval().features if isinstance(m, torch.nn.PReLU))
    prelu.weight.data.fill_(-0.5)  # pooling first would now change the outputs
    assert not net._pool_first_now() and torch.equal(net(x), built_order())
    assert ConvNet(pool_first=True)._pool_then_act is None


def test_vgg_keeps_full_resolution_through_each_block_and_pools_after_it() -> None:
    """model=vgg: convs_per_block 3x3 same-padded convolutions per block at the block's
    resolution, one pool after each block; the head reads the last block's map."""
    import torch

    from dmlrun.models.vgg import VGGNet

    net = VGGNet(embedding_dim=6, in_channels=3, channels=(4, 8), convs_per_block=2,
                 image_size=32)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(3, 4, (3, 3)), (4, 4, (3, 3)), (4, 8, (3, 3)), (8, 8, (3, 3))]
    x = torch.rand(5, 3, 32, 32)
    first_block = net.features[:6]  # two conv + BatchNorm + ReLU, before the first pool
    assert first_block(x).shape == (5, 4, 32, 32)
    assert net.features(x).shape == (5, 8, 8, 8) and net(x).shape == (5, 6)
    assert net.head[1].in_features == 8 * 8 * 8
    with pytest.raises(ValueError, match="convs_per_block=0"):
        VGGNet(convs_per_block=0)
    with pytest.raises(ValueError, match="image_size=2 is too small for 2 blocks"):
        VGGNet(image_size=2)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_compose_and_fit(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    loss = one_step(build_components(cfg), int(cfg.model.embedding_dim))
    assert loss > 0, experiment


def one_step(parts, dim: int = 16) -> float:
    """One step of a built loss, miner and sampler on a random batch the sampler draws:
    the loss is finite and its gradient reaches every embedding it used."""
    import torch

    classes = max(int(getattr(parts.sampler, "p", 10)), 10)
    labels = torch.arange(classes * 30) % classes
    epoch = parts.sampler.epoch(labels, torch.Generator().manual_seed(0))
    batch = labels[epoch.indices[0]]
    emb = torch.randn(len(batch), dim, generator=torch.Generator().manual_seed(1))
    emb.requires_grad_(True)
    indices = parts.miner(emb, batch).indices if parts.miner is not None else epoch.tuples
    out = parts.loss.compute(emb, batch, indices)
    assert torch.isfinite(out.loss) and int(out.tuples) >= 0
    out.loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert bool(emb.grad.abs().sum() > 0)  # the loss depends on the embeddings
    return float(out.loss.detach())


def test_pair_and_triplet_combinations():
    for loss in ("contrastive", "triplet"):
        for miner in ("none", "hard", "semihard", "random"):
            parts = build_components(compose_cfg([f"loss={loss}", f"miner={miner}"]))
            assert one_step(parts) > 0, (loss, miner)
            if miner != "none":  # the miner's tuples are the kind the loss takes
                assert parts.miner.yields in parts.loss.accepts
    for sampler, loss in (("pairs", "contrastive"), ("triplets", "triplet"),
                          ("triplets", "contrastive")):
        parts = build_components(compose_cfg([f"sampler={sampler}", "miner=none",
                                              f"loss={loss}"]))
        assert parts.sampler.yields == sampler and one_step(parts) > 0, (sampler, loss)


def test_triplet_loss_with_pairs_sampler_is_rejected():
    with pytest.raises(ConfigError, match="needs triplets.*gives pairs"):
        build_components(compose_cfg(["sampler=pairs", "miner=none", "loss=triplet"]))


def test_offline_sampler_with_miner_is_rejected():
    with pytest.raises(ConfigError, match="miner=none"):
        build_components(compose_cfg(["sampler=pairs", "miner=hard"]))


def test_semihard_margin_follows_loss():
    cfg = compose_cfg(["loss=triplet", "miner=semihard", "loss.margin=0.35"])
    assert build_components(cfg).miner.margin == pytest.approx(0.35)


def test_whole_batch_losses_refuse_a_miner():
    for loss in ("proxy_anchor", "lmnn", "arcface"):
        with pytest.raises(ConfigError, match="uses every sample.*miner=none"):
            build_components(compose_cfg([f"experiment={loss}", "miner=hard"]))
    with pytest.raises(ConfigError, match="takes no tuples.*sampler=pk"):
        build_components(compose_cfg(["experiment=lmnn", "sampler=triplets"]))


def test_similarity_losses_name_the_distance_they_need():
    with pytest.raises(ConfigError, match="is written for cosine.*use distance=cosine"):
        build_components(compose_cfg(["loss=multi_similarity", "miner=none"]))
    build_components(compose_cfg(["loss=multi_similarity", "miner=none", "distance=cosine"]))


@pytest.mark.parametrize("miner", ["semihard", "batch_all"])
def test_margin_window_miners_with_the_soft_margin_are_refused(miner):
    with pytest.raises(ConfigError, match=r"picks tuples within miner\.margin, .*soft margin"):
        build_components(compose_cfg([f"miner={miner}"]))  # the default loss: triplet_soft
    build_components(compose_cfg([f"miner={miner}", "loss=triplet"]))
    build_components(compose_cfg([f"miner={miner}", "miner.margin=0.3"]))


def test_margins_past_the_distance_range_are_refused():
    with pytest.raises(ConfigError, match=r"loss.margin=2.5 can never be met.*at most 2"):
        build_components(compose_cfg(["loss=triplet", "miner=semihard", "distance=cosine",
                                      "loss.margin=2.5"]))
    with pytest.raises(ConfigError, match=r"loss.beta=3 can never be met.*\(normalized\)"):
        build_components(compose_cfg(["experiment=margin", "loss.beta=3"]))
    build_components(compose_cfg(["loss=triplet", "miner=semihard", "loss.margin=2.5"]))


def test_every_loss_has_a_recipe():
    assert set(options("loss")) <= set(options("experiment"))


@pytest.mark.parametrize("group", ["loss", "model", "miner", "augment", "scheduler"])
def test_the_default_recipe_leaves_no_setting_behind_when_a_group_changes(group):
    """experiment=default sets its choices through group options, not keys under a group:
    `dmlrun loss=<any>` (or model=, ...) gets that option's own settings, nothing the
    default's choice needed (a key the other option's class does not take)."""
    for name in options(group):
        cfg = compose_cfg([f"{group}={name}"])
        alone = compose_cfg([f"{group}={name}", "experiment=contrastive"])
        assert set(cfg[group] or {}) <= set(alone[group] or {}), (group, name)


def test_the_default_recipe_on_mnist_holds_out_1000_images():
    """experiment_dataset/default_mnist.yaml: `dmlrun` alone trains on 59,000 MNIST images
    and validates on 1,000; every other experiment, and the default on another dataset,
    keeps its dataset's hold-out; the command line wins."""
    assert compose_cfg([]).dataset.val_size == 1000
    assert compose_cfg(["model.embedding_dim=64", "loss=triplet"]).dataset.val_size == 1000
    for overrides in (["experiment=contrastive"], ["experiment=triplet_hard"],
                      ["dataset=fashion_mnist"], ["dataset.val_size=5000"]):
        assert compose_cfg(overrides).dataset.val_size == 5000, overrides
    assert compose_cfg(["dataset=image_folder"]).dataset.val_size == 100


def test_triplet_with_hard_miner_gets_its_specialisation():
    """loss_miner/triplet_hard.yaml applies to exactly that pair, under experiments too;
    the command line still wins."""
    for overrides in (["loss=triplet", "miner=hard"], ["experiment=triplet_hard"]):
        cfg = compose_cfg(overrides)
        assert cfg.miner.pool_k == 2 and cfg.miner.grow and cfg.optimizer.lr == 3e-3
    # its learning rate is Adam's only
    cfg = compose_cfg(["loss=triplet", "miner=hard", "optimizer=sgd"])
    assert cfg.miner.pool_k == 2 and cfg.optimizer.lr == 0.01
    # and AdamW's, with its decoupled weight decay (soft margin too)
    for loss in ("triplet", "triplet_soft"):
        cfg = compose_cfg([f"loss={loss}", "miner=hard", "optimizer=adamw"])
        assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 3e-3
        assert cfg.optimizer.weight_decay == 0.05
    for overrides in (["experiment=contrastive"], ["loss=triplet", "miner=semihard"],
                      ["miner=easy_hard"]):
        cfg = compose_cfg(overrides)
        assert cfg.miner.get("pool_k") is None and cfg.optimizer.lr == 1e-3
    cfg = compose_cfg(["loss=triplet", "miner=hard", "miner.pool_k=null", "optimizer.lr=1e-4"])
    assert cfg.miner.pool_k is None and cfg.optimizer.lr == 1e-4


def test_the_default_recipe_and_the_previous_one_an_override_away():
    """`dmlrun` alone: experiment=default (hard triplets with the soft margin, 12 epochs,
    per-step cosine, BatchNorm with pooling first in 16- and 32-channel blocks, a milder
    affine warp (augment=affine_mild), the last epoch tested); experiment=contrastive: the
    previous default (contrastive on batch-hard pairs, 4 epochs, the cosine stepped per
    epoch, the best validation epoch tested); any other experiment replaces the default
    whole."""
    cfg = compose_cfg([])
    assert cfg.loss._target_.endswith("TripletLoss") and cfg.miner.pool_k == 2
    assert cfg.trainer.max_epochs == 12 and cfg.scheduler.anneal == "cosine"
    assert list(cfg.model.channels) == [16, 32] and cfg.model.pool_first is True
    assert cfg.loss.soft is True and cfg.loss.margin == 0
    assert "_target_" not in cfg.scheduler and cfg.optimizer.lr == 3e-3
    assert cfg.model.batch_norm is True and cfg.augment._target_.endswith("RandomAffine")
    warp = (cfg.augment.degrees, cfg.augment.shift, list(cfg.augment.scale), cfg.augment.shear)
    assert warp == (8, 1.5, [0.93, 1.07], 5)
    # augment=affine keeps its own warp, for the presets that name it
    own = compose_cfg(["experiment=semi_propagation"]).augment
    assert (own.degrees, own.shift, list(own.scale), own.shear) == (12, 2.5, [0.9, 1.1], 8)
    assert cfg.trainer.select == "last" and cfg.optimizer._target_ == "torch.optim.Adam"
    old = compose_cfg(["experiment=contrastive"])
    assert old.model.batch_norm is False and "_target_" not in old.augment
    assert old.trainer.select == "best"
    assert old.model.pool_first is False and list(old.model.channels) == [32, 64]
    assert old.loss._target_.endswith("ContrastiveLoss") and old.miner.pool_k is None
    assert old.trainer.max_epochs == 4 and old.scheduler.T_max == 4
    assert old.optimizer.lr == 1e-3 and old.trainer.warmup_epochs == 0
    semi = compose_cfg(["experiment=semi_propagation"])
    assert semi.loss._target_.endswith("TripletLoss") and semi.loss.soft is True
    assert semi.scheduler.anneal == "cosine" and semi.model.batch_norm is True
    assert semi.trainer.max_epochs == 30 and semi.trainer.select == "last"
    semi64 = compose_cfg(["experiment=semi_propagation_64d"])
    assert semi64.loss._target_.endswith("ContrastiveLoss") and semi64.model.embedding_dim == 64
    assert semi64.model.batch_norm is False and semi64.trainer.max_epochs == 10
    assert semi64.trainer.select == "best" and semi64.semi.refresh_every == 2
    assert "soft" not in semi64.loss and semi64.optimizer.lr == 1e-3
    # the student: the default's supervised recipe in 64-D, distilling its teachers
    student = compose_cfg(["experiment=semi_teachers_64d"])
    assert student.semi.graph == "teachers" and student.semi.refresh_every == 1000
    assert student.trainer.select == "last" and student.model.embedding_dim == 64
    assert student.loss._target_.endswith("TripletLoss") and student.loss.soft is True
    assert student.model.batch_norm is True and student.scheduler.anneal == "cosine"
    assert student.augment.degrees == 8.0 and student.trainer.no_aug_epochs == 1
    assert (student.trainer.max_epochs, student.sampler.batches_per_epoch) == (12, 236)
    assert student.semi.distill == 1000 and semi.semi.distill == 0

