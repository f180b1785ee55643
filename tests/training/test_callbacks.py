"""The TensorBoard reconstruction figures, read back from a real run's event file."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from exprae.train import train
from exprae.training.callbacks import ReconstructionFigures


def test_figures_are_logged_every_n_epochs(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "trainer.max_epochs=3",
        "model.latent_dim=8",
        "callbacks.reconstruction_figures.every_n_epochs=2",
        "callbacks.reconstruction_figures.max_cells=50",
    )
    train(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"reconstruction/cosine_histogram", "reconstruction/cells"}
    for tag in events.Tags()["images"]:
        images = events.Images(tag)
        # Epochs 0 and 2 of 3 (steps are global steps: 5 batches per epoch), none from trainer.validate().
        assert [im.step for im in images] == [5, 15], tag
        assert all(im.width > 300 and im.height > 200 and im.encoded_image_string[:4] == b"\x89PNG" for im in images)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        ReconstructionFigures(every_n_epochs=0)
    with pytest.raises(ValueError, match="max_cells must be >= 3"):
        ReconstructionFigures(max_cells=1)


def test_count_likelihood_run_gets_figures_and_loads(tmp_path):
    """Count models are drawn in the input's space, and exprae.load opens them (count head included)."""
    import exprae
    from conftest import train_run

    data = ["data=synthetic", "data.synthetic.n_cells=200", "data.synthetic.n_genes=100", "data.batch_size=32"]
    run = train_run(tmp_path / "run", "loss=nb", *data, "trainer.max_epochs=1", "model.latent_dim=4")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"reconstruction/cosine_histogram", "reconstruction/cells"}
    assert exprae.load(run, device="cpu").count_model
