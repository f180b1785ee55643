"""exprae-predict end to end on h5ad files written by the tests: output, overwrite, atomic writes, refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_api import write_malicious_checkpoint

from exprae import predict


@pytest.fixture
def data_path(pbmc, tmp_path) -> Path:
    path = tmp_path / "new.h5ad"
    pbmc.write_h5ad(path)
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary files a failed write could have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow  # a fresh interpreter imports torch, Lightning and scanpy
def test_cli_end_to_end(pbmc_run, data_path, tmp_path):
    out = tmp_path / "new_with_ae.h5ad"
    env = {**os.environ, "PYTHONPATH": str(Path(predict.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "exprae.predict", f"ckpt={pbmc_run}", f"data.path={data_path}", f"out={out}"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "700 cells embedded" in result.stdout
    adata = ad.read_h5ad(out)
    assert adata.obsm["X_exprae"].shape == (700, 8)
    assert adata.layers["exprae_recon"].shape == (700, 765)
    assert np.isfinite(adata.obs["exprae_cosine"]).all()
    assert np.isfinite(adata.var["exprae_gene_r"]).mean() > 0.9  # NaN: genes constant across the held-out cells
    assert adata.obs["exprae_split"].value_counts().to_dict() == {"train": 560, "val": 70, "test": 70}
    assert "held-out (val+test)      140" in result.stdout
    assert adata.uns["exprae"]["checkpoint"].endswith("best.ckpt")
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(pbmc_run, data_path, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"precious")
    args = [f"ckpt={pbmc_run}", f"data.path={data_path}", f"out={out}"]
    assert predict.main(args) == 1
    assert "exists; pass overwrite=true" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert predict.main([*args, "overwrite=true", "key_added=ae"]) == 0
    assert "X_ae" in ad.read_h5ad(out).obsm
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_no_partial_file(pbmc_run, data_path, tmp_path, monkeypatch):
    """A write that dies half-way (disk full) leaves neither a partial output nor a temporary file."""

    def write_half_then_fail(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x89HDF\r\n\x1a\n half an h5ad")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_half_then_fail)
    out = tmp_path / "out.h5ad"
    cfg = predict.parse_args([f"ckpt={pbmc_run}", f"data.path={data_path}", f"out={out}"])
    with pytest.raises(OSError, match="No space left"):
        predict.predict(cfg)
    assert not out.exists() and leftovers(tmp_path) == []
    # With overwrite=true the previous output survives a failed write intact.
    out.write_bytes(b"previous result")
    cfg.overwrite = True
    with pytest.raises(OSError, match="No space left"):
        predict.predict(cfg)
    assert out.read_bytes() == b"previous result" and leftovers(tmp_path) == []


def test_missing_genes_fail_without_output_or_zero_fill_on_request(pbmc_run, pbmc, tmp_path, capsys):
    path = tmp_path / "fewer_genes.h5ad"
    pbmc[:, 4:].copy().write_h5ad(path)
    out = tmp_path / "out.h5ad"
    args = [f"ckpt={pbmc_run}", f"data.path={path}", f"out={out}"]
    assert predict.main(args) == 1
    err = capsys.readouterr().err
    assert "4 of the 765 genes the model was trained on are missing" in err
    assert all(gene in err for gene in pbmc.var_names[:4])
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.warns(UserWarning, match="4 of the model's 765 genes are missing"):
        assert predict.main([*args, "allow_missing_genes=true"]) == 0
    assert ad.read_h5ad(out).uns["exprae"]["n_missing_genes"] == 4


def test_a_different_preprocessing_is_refused(pbmc_run, data_path, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    args = [f"ckpt={pbmc_run}", f"data.path={data_path}", f"out={out}"]
    assert predict.main([*args, "data.preprocess.log1p=true"]) == 1
    err = capsys.readouterr().err
    assert "data.preprocess.log1p=True but the model was trained with False" in err
    assert not out.exists()
    assert predict.main([*args, "data.preprocess.lognorm=true"]) == 1
    assert "unknown data.preprocess key(s) ['lognorm']" in capsys.readouterr().err
    assert predict.main([*args, "data.preprocess.log1p=false"]) == 0  # stating the saved setting is fine


def test_malicious_checkpoint_refused_by_the_cli(pbmc_run, data_path, tmp_path, capsys):
    run = shutil.copytree(pbmc_run, tmp_path / "run")
    marker = tmp_path / "marker.txt"
    write_malicious_checkpoint(run, marker)
    out = tmp_path / "out.h5ad"
    assert predict.main([f"ckpt={run}", f"data.path={data_path}", f"out={out}"]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ckpt=x", "out=y.h5ad"], 2, "missing required argument(s): data.path=..."),
        (["ckpt=x", "data.path=y", "out=z.h5ad", "ovewrite=true"], 2, "Key 'ovewrite' not in"),
        (["ckpt=x", "data.path=y", "out=z.h5ad", "batch_size=many"], 2, "batch_size: Value 'many'"),
        (["ckpt", "data.path=y"], 2, "arguments must be key=value"),
    ],
)
def test_bad_arguments(args, code, message, capsys):
    assert predict.main(args) == code
    assert message in capsys.readouterr().err


def test_bad_inputs_name_the_problem(pbmc_run, data_path, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    base = [f"ckpt={pbmc_run}", f"out={out}"]
    assert predict.main([*base, f"data.path={tmp_path / 'none.h5ad'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert predict.main([*base, f"data.path={data_path}", "data.layer=counts"]) == 1
    assert "layer 'counts' not found; available layers" in capsys.readouterr().err
    assert predict.main([f"ckpt={tmp_path}", f"data.path={data_path}", f"out={out}"]) == 1
    assert "no checkpoint in" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(data_path.read_bytes()[:5000])
    assert predict.main([*base, f"data.path={corrupt}"]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
