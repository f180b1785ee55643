"""Apply a trained run to cells: ``exprae.load`` a run directory, ``exprae.embed`` an AnnData (scanpy style).

Loading never executes code from the run: the config and the data contract are plain YAML/JSON, only
``exprae.*`` and ``torch.*`` targets are instantiated from the config, and the weights are read with
``torch.load(weights_only=True)``, which refuses a pickle that would run code.

The model works in its *preprocessed gene space*: the contract's genes (the highly variable subset when the
run used ``n_top_genes``), after the run's normalisation, log and scaling. ``embed`` therefore writes

* ``obsm["X_{key}"]``: the latent code of every cell;
* ``layers["{key}_recon"]`` (the model covers every gene) or ``obsm["{key}_recon"]`` (the model's genes only,
  named in ``uns["{key}"]["recon_var_names"]``): the reconstruction, in the preprocessed space (not counts);
  see :mod:`exprae.inference.outputs` for the layouts and ``recon="none"`` to skip it;
* ``obs["{key}_cosine"]``, ``obs["{key}_pearson"]``, ``obs["{key}_mse"]``: per-cell agreement of
  reconstruction and preprocessed input;
* ``obs["{key}_split"]``: each cell's split in the run that trained the model (train / val / test, matched by
  cell name against the run's ``split.csv``; "new" for cells it never saw), so no score over training cells
  passes for a held-out one (:mod:`exprae.inference.splits`);
* ``var["{key}_gene_r"]``: per-gene Pearson r across the cells the model was not trained on (held-out and new;
  across all cells only where every cell is a training cell, as ``uns["{key}"]["gene_r_cells"]`` says); NaN
  outside the model's genes or for a gene constant in these cells;
* ``uns["{key}"]``: the settings, model and gene bookkeeping.

A model trained with ``data.batch_key`` reads each cell's covariate levels from the same obs columns (a level
it was not trained with is an error listing the known ones). ``transform_batch="ctrl"`` writes the
counterfactual reconstruction instead: every cell encoded with its own batch and decoded as if measured in
``ctrl`` (scVI's ``transform_batch``); the per-cell and per-gene scores still compare each cell's own
reconstruction with its input.

``ExpraeModel.transform`` returns the preprocessed input itself, the "true" side of every comparison.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from exprae.data import check_matrix, check_names, select_matrix
from exprae.data.covariates import level_code, recode
from exprae.data.preprocessing import Preprocessing
from exprae.errors import ConfigError, DataError, DataFileNotFoundError
from exprae.inference.outputs import Recon, check_recon, write_reconstruction
from exprae.inference.representation import WARN as REPRESENTATION_WARN
from exprae.inference.representation import GeneMoments, compare_moments, raw_findings
from exprae.inference.splits import gene_r_cells, split_counts, split_marks
from exprae.nn import AutoEncoder
from exprae.nn.baselines import Baselines
from exprae.runs import rundir
from exprae.runs.checkpoint import UnsafeCheckpointError, read_checkpoint
from exprae.runs.output_gate import check_key_name
from exprae.scoring.metrics import per_cell_metrics

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt")  # tried in this order for a run directory
ALLOWED_TARGETS = ("exprae.", "torch.")  # module prefixes a saved config may instantiate
_SHOWN = 20  # gene names quoted in a message


class GeneMismatchError(DataError):
    """The data lacks genes the model was trained on."""


# ---------------------------------------------------------------- the loaded model


class ExpraeModel:
    """A trained autoencoder and everything needed to apply it: network, baselines, preprocessing, genes."""

    def __init__(
        self,
        *,
        net: AutoEncoder,
        baselines: Baselines,
        preprocess: Preprocessing,
        layer: str | None,
        run_dir: Path,
        checkpoint: Path,
        loss: str,
        batch_categories: dict[str, list[str]] | None = None,
    ) -> None:
        if preprocess.genes is None or len(preprocess.genes) != net.n_genes:
            raise DataError(
                f"the data contract lists {0 if preprocess.genes is None else len(preprocess.genes)} genes but the "
                f"network expects {net.n_genes}"
            )
        self.net = net.eval()
        self.baselines = baselines.eval()
        self.preprocess = preprocess
        self.layer = layer
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        self.loss = loss
        # Covariate levels in code order (data.batch_key at training); empty without covariates.
        self.batch_categories = dict(batch_categories or {})

    @property
    def var_names(self) -> list[str]:
        """The genes the network reads and reconstructs, in its order."""
        return list(self.preprocess.genes)

    @property
    def latent_dim(self) -> int:
        return self.net.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def history(self) -> pd.DataFrame:
        """The run's per-epoch metrics (``history.csv``; epoch 0 is the model before training), as scvi-tools'
        ``model.history``; empty for a run trained before exprae wrote it."""
        path = self.run_dir / rundir.HISTORY_FILE
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def to(self, device: str | torch.device) -> ExpraeModel:
        """Move the network and baselines to ``device`` (in place; returns self)."""
        self.net.to(device)
        self.baselines.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"ExpraeModel(loss={self.loss}, genes={self.net.n_genes}, latent_dim={self.latent_dim}, "
            f"checkpoint={str(self.checkpoint)!r}, device={self.device})"
        )

    def transform(
        self, adata: ad.AnnData, *, layer: str | None = None, allow_missing_genes: bool = False
    ) -> ad.AnnData:
        """The network's input for ``adata``: the saved preprocessing applied, genes in the model's order.

        Whole matrix in memory; :func:`embed` does the same per batch.
        """
        source = _InputMatrix.from_adata(self, adata, layer=layer, allow_missing_genes=allow_missing_genes)
        out = source.preprocessed(np.arange(adata.n_obs))
        out.obs = adata.obs.copy()
        return out


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device torch knows (auto, cpu, cuda, cuda:1, ...): {e}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} was asked for, but torch sees no CUDA GPU here; use device=cpu or device=auto"
        )
    return resolved


# ---------------------------------------------------------------- load


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` for a run directory (best, else last checkpoint) or a checkpoint file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"{path} does not exist: pass a run directory or a .ckpt file inside one")
    if path.is_dir():
        run_dir = path
        for name in CHECKPOINT_NAMES:
            if (path / CHECKPOINT_DIR / name).is_file():
                return run_dir, path / CHECKPOINT_DIR / name
        found = (
            sorted(p.name for p in (path / CHECKPOINT_DIR).glob("*.ckpt")) if (path / CHECKPOINT_DIR).is_dir() else []
        )
        raise DataFileNotFoundError(
            f"no checkpoint in {path / CHECKPOINT_DIR} (looked for {', '.join(CHECKPOINT_NAMES)}; found "
            f"{found or 'none'}); was the run trained with callbacks=none?"
        )
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    return run_dir, path


def _check_targets(node: Any, where: str) -> None:
    """Refuse any ``_target_`` outside exprae and torch, so a saved config cannot run arbitrary code."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGETS):
            raise UnsafeCheckpointError(
                f"{where}._target_={target!r} is not an exprae or torch class; exprae.load only instantiates "
                f"targets starting with {ALLOWED_TARGETS}"
            )
        for key, value in node.items():
            _check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config as plain data (YAML, safe loader), with the model section resolved."""
    from omegaconf import OmegaConf

    path = run_dir / rundir.CONFIG_FILE
    if not path.is_file():
        raise DataFileNotFoundError(f"{path} not found: {run_dir} is not an exprae run directory (no saved config)")
    cfg = OmegaConf.load(path)
    if "model" not in cfg:
        raise DataError(f"{path} has no 'model' section; it was not written by exprae-train")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    loss = OmegaConf.to_container(cfg.loss, resolve=False) if "loss" in cfg else {}
    return {"model": model, "loss": loss}


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load(path: str | Path, *, device: str | torch.device = "auto") -> ExpraeModel:
    """Load a trained model from a run directory (best checkpoint, else last) or a ``.ckpt`` inside one."""
    run_dir, checkpoint = resolve_checkpoint(path)
    contract = rundir.read_json(run_dir / rundir.CONTRACT_FILE)
    preprocess = Preprocessing.from_dict(contract["preprocess"])
    if preprocess.genes is None:
        preprocess.genes = list(contract["var_names"])
    if list(preprocess.genes) != list(contract["var_names"]):
        raise DataError(f"{run_dir / rundir.CONTRACT_FILE}: var_names and preprocess.genes disagree")

    config = _read_run_config(run_dir)
    _check_targets(config["model"], "model")
    model_cfg = {k: v for k, v in config["model"].items() if k not in ("_target_", "n_genes", "n_batches")}
    target = config["model"].get("_target_", "exprae.nn.AutoEncoder")
    if target != "exprae.nn.AutoEncoder":
        raise DataError(f"exprae.load knows how to rebuild exprae.nn.AutoEncoder, not {target!r}")
    batch_categories = contract.get("batch_categories") or {}
    n_batches = [len(levels) for levels in batch_categories.values()]
    net = AutoEncoder(len(preprocess.genes), **model_cfg, n_batches=n_batches)
    baselines = Baselines(net.n_genes, net.latent_dim, n_batches=n_batches[0] if n_batches else 0)

    state = read_checkpoint(checkpoint)["state_dict"]
    if any(k.startswith(("net.count_head.", "input_view.")) for k in state):
        raise DataError(
            f"{checkpoint} was trained with a count likelihood ({config['loss'].get('_target_')}); exprae.load and "
            "exprae.embed apply models trained with mse/cosine/mixed/pearson losses only, for now"
        )
    mismatch = (
        f"{checkpoint} does not match the network described by {run_dir / rundir.CONFIG_FILE} (trained by "
        "another exprae version, or the config edited after training?)"
    )
    for name, part in (("net.", net), ("baselines.", baselines)):
        try:
            result = part.load_state_dict(_sub_state(state, name), strict=False)
        except RuntimeError as e:  # a tensor of another shape, e.g. model.latent_dim changed in the config
            sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:3]
            raise DataError(f"{mismatch}: {'; '.join(sizes) or e}") from e
        if result.missing_keys or result.unexpected_keys:
            raise DataError(
                f"{mismatch}: missing {[name + k for k in result.missing_keys][:5]}, "
                f"unexpected {[name + k for k in result.unexpected_keys][:5]}"
            )
    loss = str(config["loss"].get("_target_", "unknown")).rsplit(".", 1)[-1]
    model = ExpraeModel(
        net=net,
        baselines=baselines,
        preprocess=preprocess,
        layer=contract.get("layer"),
        run_dir=run_dir,
        checkpoint=checkpoint,
        loss=loss,
        batch_categories=batch_categories,
    )
    return model.to(_resolve_device(device))


# ---------------------------------------------------------------- aligning new data


class _InputMatrix:
    """The chosen matrix of new data, its gene alignment to the model, and per-row-block preprocessing."""

    def __init__(
        self,
        model: ExpraeModel,
        x: np.ndarray | sp.spmatrix,
        *,
        obs_names: pd.Index,
        var_names: pd.Index,
        layer: str,
        allow_missing_genes: bool,
    ) -> None:
        check_names(obs_names, var_names, what=f"the data ({layer})")
        genes = pd.Index(model.var_names)
        self.missing = [str(g) for g in genes[~genes.isin(var_names)]]
        if len(self.missing) == len(genes):  # zero-filling everything would embed nothing but zeros
            raise GeneMismatchError(
                f"none of the {len(genes)} genes the model was trained on is in the data ({layer}; its genes start "
                f"{list(var_names[:5])}, the model's {list(genes[:5])}): another organism or gene annotation "
                "(symbols vs Ensembl ids)?"
            )
        if self.missing and not allow_missing_genes:
            raise GeneMismatchError(
                f"{len(self.missing)} of the {len(genes)} genes the model was trained on are missing from the data "
                f"({layer}): {', '.join(self.missing[:_SHOWN])}{', ...' if len(self.missing) > _SHOWN else ''}. "
                "Use data with the same gene names (e.g. the same annotation), or pass allow_missing_genes=True "
                "to fill them with zeros (a warning says how many)."
            )
        if self.missing:
            warnings.warn(
                f"{len(self.missing)} of the model's {len(genes)} genes are missing from the data and were filled "
                f"with zeros (first: {', '.join(self.missing[:5])}); per-cell metrics use the {len(genes) - len(self.missing)} "
                "genes present, but latents and reconstructions of these cells are less reliable",
                UserWarning,
                stacklevel=4,  # the user's embed()/transform() call
            )
        self.present_g = ~genes.isin(self.missing)
        model.preprocess.check_library_genes(var_names, allow_missing=allow_missing_genes, what=f"the data ({layer})")
        # normalize_total sums over every gene of the data, so its NaNs matter even outside the model's genes.
        if model.preprocess.normalize_total is not None:
            used = np.arange(len(var_names))
        else:
            used = var_names.get_indexer(genes[self.present_g])
        x = sp.csr_matrix(x) if sp.issparse(x) and x.format != "csr" else x  # row blocks are cheap from CSR
        check_matrix(
            x[:, used] if len(used) < len(var_names) else x,
            obs_names=obs_names,
            var_names=var_names[used],
            nonnegative=model.preprocess.needs_nonnegative,
            what=f"data ({layer})",
        )
        self.model, self.x, self.obs_names, self.var_names, self.layer = model, x, obs_names, var_names, layer

    @classmethod
    def from_adata(
        cls, model: ExpraeModel, adata: ad.AnnData, *, layer: str | None, allow_missing_genes: bool
    ) -> _InputMatrix:
        """Select the matrix (``layer=None``: the one the model was trained on) and check it."""
        layer = model.layer if layer is None else layer
        selected = select_matrix(adata, layer)
        return cls(
            model,
            selected.X,
            obs_names=adata.obs_names,
            var_names=selected.var_names,
            layer="X" if layer in (None, "X") else layer,
            allow_missing_genes=allow_missing_genes,
        )

    def preprocessed(self, rows: np.ndarray) -> ad.AnnData:
        """Rows ``rows`` with missing genes zero-filled (before preprocessing, as unmeasured counts) and the
        saved preprocessing applied; the result's genes are the model's, in its order."""
        block = self.x[rows]
        block = block.astype(np.float32) if sp.issparse(block) else np.asarray(block, dtype=np.float32)
        var_names = self.var_names
        if self.missing:
            zeros = np.zeros((block.shape[0], len(self.missing)), dtype=np.float32)
            block = (
                sp.hstack([block, sp.csr_matrix(zeros)], format="csr")
                if sp.issparse(block)
                else np.hstack([block, zeros])
            )
            var_names = var_names.append(pd.Index(self.missing))
        chunk = ad.AnnData(X=block, obs=pd.DataFrame(index=self.obs_names[rows]), var=pd.DataFrame(index=var_names))
        return self.model.preprocess.transform(chunk)


def _row_blocks(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


class _GeneCorrelation:
    """Per-gene Pearson r between two matrices, accumulated over row blocks in float64."""

    def __init__(self, n_genes: int, device: torch.device) -> None:
        self.n = 0
        self.sums = torch.zeros(5, n_genes, dtype=torch.float64, device=device)  # x, y, xx, yy, xy

    def update(self, x_ng: torch.Tensor, y_ng: torch.Tensor) -> None:
        x, y = x_ng.double(), y_ng.double()
        self.n += x.shape[0]
        self.sums += torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])

    def compute(self) -> np.ndarray:
        sx, sy, sxx, syy, sxy = (self.sums / max(self.n, 1)).unbind(0)
        cov = sxy - sx * sy
        var_x, var_y = (sxx - sx * sx).clamp_min(0), (syy - sy * sy).clamp_min(0)
        denom = (var_x * var_y).sqrt()
        # A gene constant across these cells has no correlation to speak of: NaN, not 0. "Constant" is relative
        # to the gene's second moment, since E[x²] − E[x]² of identical values leaves float64 round-off, not 0.
        varies = (var_x > 1e-12 * sxx) & (var_y > 1e-12 * syy)
        r = torch.where(varies, cov / denom.clamp_min(1e-300), torch.full_like(cov, float("nan")))
        return r.clamp(-1, 1).cpu().numpy()


# ---------------------------------------------------------------- embed


def embed(
    model: ExpraeModel,
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    key_added: str = "exprae",
    batch_size: int = 1024,
    allow_missing_genes: bool = False,
    baselines: bool = False,
    transform_batch: str | None = None,
    recon: Recon = "auto",
    copy: bool = False,
) -> ad.AnnData:
    """Encode and reconstruct every cell of ``adata``; write the results where scanpy users look.

    ``recon`` places the reconstruction (:mod:`exprae.inference.outputs`): ``"auto"`` a layer when the model
    covers every gene of ``adata``, else ``obsm["{key}_recon"]`` over the model's genes only; ``"layer"``,
    ``"obsm"`` or ``"none"`` (skip it: latent and scores are always written).

    ``layer=None`` reads the matrix the model was trained on (its contract's layer); genes are matched by
    name, so their order does not matter. ``baselines=True`` also writes the per-cell cosine of the mean-profile
    and PCA baselines (``obs["{key}_meanprofile_cosine"]``, ``obs["{key}_pca_cosine"]``). A model trained with
    covariates reads them from ``adata.obs``; ``transform_batch`` (a level of the batch) makes
    ``layers["{key}_recon"]`` the counterfactual: each cell decoded as if from that batch. Returns ``adata``
    (modified in place) or, with ``copy=True``, a modified copy.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    check_key_name(key_added, what="key_added")
    check_recon(recon)
    target_code = None if transform_batch is None else level_code(model.batch_categories, transform_batch)
    batch_nk = recode(adata.obs, model.batch_categories, what="the data") if model.batch_categories else None
    adata = adata.copy() if copy else adata
    source = _InputMatrix.from_adata(model, adata, layer=layer, allow_missing_genes=allow_missing_genes)
    device = model.device
    present_g = torch.as_tensor(source.present_g, device=device)
    genes = pd.Index(model.var_names)
    # Where each model gene goes in adata's own gene order (-1: not one of adata's genes, e.g. a raw-only gene).
    dest = adata.var_names.get_indexer(genes)
    written = (dest >= 0) & source.present_g

    z_nk = np.empty((adata.n_obs, model.latent_dim), dtype=np.float32)
    # Only the model's genes that are in adata: never a cells x all-genes array of NaN (see outputs).
    recon_nm = np.empty((adata.n_obs, int(written.sum()) if recon != "none" else 0), dtype=np.float32)
    cell = {name: np.empty(adata.n_obs, dtype=np.float32) for name in ("cosine", "pearson", "mse")}
    if baselines:
        cell.update({name: np.empty(adata.n_obs, dtype=np.float32) for name in ("meanprofile_cosine", "pca_cosine")})
    gene_r = _GeneCorrelation(int(present_g.sum()), device)
    moments = GeneMoments(int(present_g.sum()), device)
    findings = raw_findings(source.x[: min(adata.n_obs, batch_size)], model.preprocess.settings())
    splits_n = split_marks(adata.obs_names, model.run_dir)
    # Per-gene r over the cells the model was not trained on (all cells only when every one is a training cell).
    gene_r_rows, gene_r_covers = gene_r_cells(splits_n)

    with torch.inference_mode():
        for rows in _row_blocks(adata.n_obs, batch_size):
            x = source.preprocessed(rows).X
            x_ng = torch.from_numpy(x.toarray() if sp.issparse(x) else np.ascontiguousarray(x)).to(device)
            codes_nk = None if batch_nk is None else torch.from_numpy(batch_nk[rows]).to(device)
            out = model.net(x_ng, codes_nk)
            recon_ng = out["recon"].float()
            written_ng = recon_ng
            if target_code is not None:  # the counterfactual: encoded as measured, decoded as if from one batch
                as_target_nk = codes_nk.clone()
                as_target_nk[:, 0] = target_code
                written_ng = model.net(x_ng, codes_nk, decode_batch_nk=as_target_nk)["recon"].float()
            scores = per_cell_metrics(recon_ng[:, present_g], x_ng[:, present_g])
            for name in ("cosine", "pearson", "mse"):
                cell[name][rows] = scores[name].cpu().numpy()
            if baselines:
                for who, base_ng in model.baselines(x_ng).items():  # the plain baselines, as without covariates
                    name = "meanprofile_cosine" if who == "mean" else f"{who}_cosine"
                    cell[name][rows] = (
                        per_cell_metrics(base_ng[:, present_g], x_ng[:, present_g])["cosine"].cpu().numpy()
                    )
            moments.update(x_ng[:, present_g])
            keep = torch.as_tensor(gene_r_rows[rows], device=device)
            gene_r.update(x_ng[keep][:, present_g], recon_ng[keep][:, present_g])
            z_nk[rows] = out["z"].float().cpu().numpy()
            if recon != "none":
                recon_nm[rows] = written_ng[:, torch.as_tensor(written, device=device)].cpu().numpy()

    r_model = np.full(len(genes), np.nan, dtype=np.float32)
    r_model[source.present_g] = gene_r.compute()
    r_var = np.full(adata.n_vars, np.nan, dtype=np.float32)
    r_var[dest[dest >= 0]] = r_model[dest >= 0]

    adata.obsm[f"X_{key_added}"] = z_nk
    for name, values in cell.items():
        adata.obs[f"{key_added}_{name}"] = values
    adata.var[f"{key_added}_gene_r"] = r_var
    adata.uns[key_added] = _settings(model, source, key_added=key_added, batch_size=batch_size, baselines=baselines)
    where = write_reconstruction(adata, recon_nm, list(genes[written]), key=key_added, recon=recon)
    adata.uns[key_added]["keys"]["recon"] = None if where is None else f"{where}/{key_added}_recon"
    adata.obs[f"{key_added}_split"] = splits_n
    adata.uns[key_added]["representation"] = _check_representation(model, moments, findings, source.present_g)
    adata.uns[key_added]["n_cells_per_split"] = split_counts(splits_n)
    adata.uns[key_added]["gene_r_cells"] = gene_r_covers
    if model.batch_categories:
        adata.uns[key_added]["batch_keys"] = list(model.batch_categories)
        adata.uns[key_added]["transform_batch"] = "" if transform_batch is None else str(transform_batch)
    return adata


def _check_representation(
    model: ExpraeModel, moments: GeneMoments, findings: list[str], present_g: np.ndarray
) -> dict[str, Any]:
    """Compare the embedded cells with the training cells' statistics; warn on each sign of another representation."""
    base = model.baselines
    comparison = compare_moments(
        moments, base.mean_g.double().cpu().numpy()[present_g], base.variance_g.double().cpu().numpy()[present_g]
    )
    if comparison is not None and comparison.worst > REPRESENTATION_WARN:
        findings = [*findings, f"{comparison.text()}, as if prepared differently from the training data"]
    for finding in findings:
        warnings.warn(
            f"these cells may not be in the representation the model was trained on: {finding}. Scores and latents "
            "of such data are not meaningful; use the same matrix (data.layer) and preparation as in training",
            UserWarning,
            stacklevel=3,
        )
    return {
        "shift": None if comparison is None else comparison.shift,
        "spread": None if comparison is None else comparison.spread,
        "findings": list(findings),
    }


def _settings(
    model: ExpraeModel, source: _InputMatrix, *, key_added: str, batch_size: int, baselines: bool
) -> dict[str, Any]:
    """What ``uns[key_added]`` records: the model, the matrix and genes used, and where results went."""
    preprocess = {k: v for k, v in model.preprocess.settings().items() if v is not None}
    return {
        "run_dir": str(model.run_dir),
        "checkpoint": str(model.checkpoint),
        "loss": model.loss,
        "latent_dim": model.latent_dim,
        "layer": source.layer,
        "n_model_genes": len(model.var_names),
        "n_missing_genes": len(source.missing),
        "missing_genes": list(source.missing),
        "preprocess": preprocess,
        "batch_size": batch_size,
        "baselines": baselines,
        "keys": {
            "obsm": f"X_{key_added}",
            "obs": [f"{key_added}_{name}" for name in ("cosine", "pearson", "mse", "split")],
            "var": f"{key_added}_gene_r",
        },
    }
