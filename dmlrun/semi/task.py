"""The semi-supervised task (task=semi_supervised): ``dataset.labeled_per_class`` labels
per class are kept, the other training labels hidden, and the ``semi`` group's method
(or none: the labeled images alone) turns the unlabeled images into pseudo-labeled
batches; ``semi.views`` adds a loss on two augmented views of any training image.

Its settings are the ``semi`` group (``SemiSettings``), checked before any data loads."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dmlrun import distributed
from dmlrun.checkpoint import resolve_checkpoint
from dmlrun.components import build, choice
from dmlrun.data.dataset import Split
from dmlrun.data.samplers import Epoch
from dmlrun.embedder import RunEmbedding
from dmlrun.errors import ConfigError, UserError
from dmlrun.evaluation import raw_pixels
from dmlrun.semi.labels import (
    FEATURE_LAYERS,
    GRAPH_SPACES,
    MIN_GRAPH_DIM,
    SemiSupervision,
    feature_layer,
    pick_labeled,
)
from dmlrun.semi.plots import pseudo_label_plot
from dmlrun.settings import Settings, read, setting
from dmlrun.task import Task, TaskContext
from dmlrun.train import DistillTerm, ViewsTerm

log = logging.getLogger("dmlrun")


@dataclass(frozen=True)
class SemiSettings:
    """``semi``: configs/semi/*.yaml say what each does. With ``method`` null (semi=none,
    the labeled images alone) the others may be absent; with a method they are needed."""

    method: Any = setting(optional=True)  # a _target_ node (checked by its signature)
    graph: str | None = setting(choices=GRAPH_SPACES, optional=True)
    features: str | None = setting(choices=FEATURE_LAYERS, optional=True)
    warmup_epochs: int | None = setting(minimum=0, optional=True)
    refresh_every: int | None = setting(minimum=1, optional=True)
    unlabeled_weight: float | None = setting(minimum=0, optional=True)
    p: int | None = setting(minimum=2, optional=True)
    k: int | None = setting(minimum=2, optional=True)
    views: Any = setting(optional=True)  # ViewsSettings' node, or absent (off)
    # run folders whose embeddings make the graph with graph=teachers (absent: none)
    teachers: list[str] | None = setting(optional=True)
    # weight of the relational distillation of the teachers' embeddings (absent: 0, off)
    distill: float | None = setting(minimum=0, optional=True)


@dataclass(frozen=True)
class ViewsSettings:
    """``semi.views``: the two-view loss, off at weight 0."""

    weight: float = setting(minimum=0)
    batch: int = setting(minimum=2)
    loss: Any = setting()
    augment: Any = setting()


class SemiSupervisedTask(Task):
    """A few labels per class; pseudo-labels (and two views) for the other images."""

    schema = ("semi", SemiSettings)

    def __init__(self, cfg: DictConfig, settings: Settings, world: int) -> None:
        self.settings, self.semi = settings, settings.task
        self.per_class = settings.dataset.labeled_per_class
        self.method_name = choice(cfg, "semi")
        if self.per_class is None:
            raise ConfigError(f"task=semi_supervised (semi={self.method_name}) needs "
                              "unlabeled images: set dataset.labeled_per_class=<n> (e.g. 10)")
        if cfg.sampler.get("yields"):
            raise ConfigError("semi-supervised runs draw P x K batches: use sampler=pk")
        s = self.semi
        if s.method is not None:
            for f in fields(SemiSettings):
                if getattr(s, f.name) is None and f.name not in ("views", "teachers",
                                                                 "distill"):
                    raise ConfigError(f"semi.{f.name} has no value and needs one with "
                                      f"semi={self.method_name}")
        if (s.graph == "teachers") != bool(s.teachers):
            raise ConfigError("semi.graph=teachers builds the graph from the runs in "
                              "semi.teachers, and semi.teachers is read only then: set both "
                              f"(now graph={s.graph}, teachers={s.teachers})")
        if s.distill and s.graph != "teachers":
            raise ConfigError(f"semi.distill={s.distill} distils the teachers' embeddings: "
                              "set semi.graph=teachers and semi.teachers=[<run>,...] too")
        self.views = self._views(cfg, world)
        self.layer = feature_layer(s.features or "output",
                                   int(cfg.model.get("embedding_dim", MIN_GRAPH_DIM)))

    def _views(self, cfg: DictConfig, world: int) -> ViewsTerm | None:
        """``semi.views``: the loss on two augmented views of training images, or None."""
        if self.semi.views is None:
            return None
        views = read(self.semi.views, ViewsSettings, "semi.views")
        if views.weight == 0:
            return None
        if views.batch % world:
            raise ConfigError(f"semi.views.batch={views.batch} images cannot be shared "
                              f"evenly by {world} processes; use a multiple of {world}")
        where = f"semi={self.method_name} semi.views"
        self.views_batch = views.batch
        return ViewsTerm(build(views.loss, f"{where}.loss"),
                         build(views.augment, f"{where}.augment"), views.weight)

    def start(self, context: TaskContext) -> None:
        """Hide the training labels but ``labeled_per_class`` per class (the chosen
        indices go to labeled_indices.json) and set up the method."""
        super().start(context)
        data, seed = context.data, self.settings.data_seed
        try:
            labeled = pick_labeled(data.train.labels, self.per_class, seed)
        except ValueError as exc:
            raise ConfigError(f"dataset.labeled_per_class={self.per_class}: {exc}") from exc
        if context.main:
            with open(context.run_dir / "labeled_indices.json", "w") as f:
                json.dump({"seed": seed, "labeled_per_class": self.per_class,
                           "indices": labeled.tolist()}, f)
        s = self.semi
        self.teachers = [self._teacher(path, labeled) for path in s.teachers or ()]
        self._teachers_features: torch.Tensor | None = None
        method = build(s.method, f"semi={self.method_name}") if s.method is not None else None
        log.info("semi-supervised: %d labeled training images, %d unlabeled; method %s",
                 len(labeled), len(data.train) - len(labeled),
                 s.method and s.method._target_.rsplit(".", 1)[-1])
        given = {name: getattr(s, name) for name in ("warmup_epochs", "refresh_every", "p",
                                                     "k", "graph")
                 if getattr(s, name) is not None}  # without a method, none is needed
        self.state = SemiSupervision(
            data.train.labels, labeled, data.num_classes, context.sampler, method,
            val_truth=data.val.labels,
            views_batch=0 if self.views is None else self.views_batch, **given)
        # the loop reads these labels; the refreshes rewrite them in place
        self.split = data.train.with_labels(self.state.labels)

    def _teacher(self, path: str, labeled: torch.Tensor) -> Path:
        """The checkpoint of a trained run whose embedding joins the graph; it must have
        kept the labels of the same images (the same dataset.split_seed), or its embedding
        has seen labels this run hides. Loaded only to build the graph (once)."""
        picks = Path(path) / "labeled_indices.json"
        if not picks.is_file():
            raise ConfigError(f"semi.teachers: {picks} not found; a teacher is the folder of "
                              "a finished semi-supervised run")
        theirs = json.loads(picks.read_text())["indices"]
        if theirs != labeled.tolist():
            raise ConfigError(f"semi.teachers: {path} kept the labels of other images than "
                              "this run; train the teachers with this run's "
                              "dataset.labeled_per_class and dataset.split_seed")
        try:
            return resolve_checkpoint(path)
        except UserError as exc:
            raise ConfigError(f"semi.teachers: {exc}") from None

    def train_split(self) -> Split:
        return self.split

    def _features(self, space: str) -> torch.Tensor:
        """(N + V, F) features of every training image, then every validation image, for
        the pseudo-label graph."""
        data, ctx = self.context.data, self.context
        if space == "pixels":
            return torch.cat([raw_pixels(data.train), raw_pixels(data.val)])
        if space == "teachers":
            return self._teachers()
        read_out = ctx.features if self.layer == "penultimate" else ctx.embed
        return torch.cat([read_out(split) for split in (data.train, data.val)])

    def _teachers(self) -> torch.Tensor:
        """(N + V, T) the teachers' unit-length embeddings side by side, of every training
        image, then every validation image (computed once)."""
        if self._teachers_features is None:
            data = self.context.data
            device = next(self.context.model.parameters()).device
            teachers = [RunEmbedding(path, device=str(device)) for path in self.teachers]
            self._teachers_features = torch.cat([
                torch.cat([F.normalize(t.split(split), dim=1) for t in teachers], dim=1)
                for split in (data.train, data.val)])
        return self._teachers_features

    def next_epoch(self, rng: torch.Generator, main: bool) -> Epoch:
        # the main process refreshes the pseudo-labels and shares them
        return self.state.next_epoch(self._features, rng, main, distributed.broadcast)

    def step_options(self) -> dict[str, Any]:
        weight, distill = self.semi.unlabeled_weight, self.semi.distill
        options: dict[str, Any] = {"views": self.views}
        if weight is not None:
            options["extra_weight"] = weight
        if distill:  # every process distils: each embeds the training images
            targets = self._teachers()[:len(self.context.data.train)]
            options["distill"] = DistillTerm(targets, distill)
        return options

    def end_epoch(self, record: dict[str, Any]) -> None:
        if note := self.state.take_note():
            log.info("epoch %d: %s", record["epoch"], note)
        if not self.state.quality:
            return
        q = self.state.quality
        record.update(q)
        log.info("epoch %d: pseudo-labels from %s %.1f%% right on the validation images "
                 "(hidden: %.1f%% right on the unlabeled training images); kept %.1f%% of "
                 "them, %.1f%% right", record["epoch"],
                 {"pixels": "raw pixels", "teachers": "the teachers' embeddings"}.get(
                     self.state.space, "the model's features"),
                 100 * q["pseudo_val_accuracy"], 100 * q["pseudo_accuracy"],
                 100 * q["pseudo_kept_fraction"], 100 * q["pseudo_kept_accuracy"])

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.state.load_state_dict(state)

    def write_plots(self, history: Sequence[dict], plot_dir: Path) -> None:
        if any("pseudo_accuracy" in h for h in history):
            pseudo_label_plot(history, plot_dir / "pseudo_labels.png")
