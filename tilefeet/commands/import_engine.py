"""``tilefeet import-engine`` and ``tilefeet export-engine``: networks from elsewhere in, bundles out.

    tilefeet import-engine model.onnx -o engines/my-membranes --pixel-size 4nm --classes membrane \\
        --activation sigmoid --normalize meanstd:125,43
    tilefeet import-engine model.pt2 -o engines/NAME ...          # a torch.export program
    tilefeet import-engine path/to/rdf.yaml -o engines/zoo-model   # a bioimage.io package (or its .zip)
    tilefeet export-engine isbi-membrane --bioimageio -o isbi-membrane.zip

The imported bundle's folder is printed on stdout; what was measured (divisor, receptive field,
recommended tile and overlap, backends) goes to stderr. An output that cannot be written (a file in
its place, a read-only folder, a path the OS refuses) is refused before the network is measured;
an OS error while writing (a full disk) is one line naming the output, never a temporary folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("import-engine")(import_engine)
    app.command("export-engine")(export_engine)


def import_engine(
    source: Path = typer.Argument(..., help="An ONNX graph (.onnx), a torch.export program (.pt2), TorchScript (.pt), or a bioimage.io rdf.yaml / package .zip."),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle folder to write, e.g. engines/my-membranes."),
    pixel_size: Optional[str] = typer.Option(None, "--pixel-size", help="Pixel size the network was trained at, e.g. 4nm (a package's axes say it)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Names of the output channels, comma-separated, e.g. membrane or membrane,mito."),
    activation: Optional[str] = typer.Option(
        None, "--activation", help="Applied to the network's output: sigmoid, softmax, or none (it returns probabilities). "
        "Required for network files; a bioimage.io package declares it (this overrides it).",
    ),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="What the network expects (required for network files): meanstd:MEAN,STD, range:LOW,HIGH, percentile:P1,P2 (per section), zscore (per section)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="Input channels (read from ONNX and .pt2 graphs; needed for TorchScript)."),
    receptive_field: Optional[int] = typer.Option(None, "--receptive-field", help="Declare the receptive field (px) instead of measuring it."),
    name: Optional[str] = typer.Option(None, "--name", help="Engine name (default: the folder's name)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle folder."),
) -> None:
    """Import a trained network (ONNX, torch.export, TorchScript, bioimage.io) as an engine bundle."""
    from ..console import echo

    if source.suffix.lower() in (".yaml", ".yml", ".zip") or source.is_dir():
        from ..bioimageio import import_package

        check_output(out, overwrite=overwrite)
        bundle = import_package(source, out, pixel_size_nm=pixel_size, classes=classes, name=name,
                                receptive_field=receptive_field, overwrite=overwrite, activation=activation)
    else:
        from ..engine import Declared, check_network_file, import_network

        check_network_file(source)  # what the file is, before what the user must declare about it
        declared = Declared.create(pixel_size_nm=pixel_size, classes=classes, activation=activation, normalization=normalize,
                                   in_channels=channels, receptive_field=receptive_field)
        check_output(out, overwrite=overwrite)  # before the network is measured (seconds to minutes)
        bundle = import_network(source, out, declared, name=name, overwrite=overwrite)
    echo(
        f"{bundle.network} network: {bundle.in_channels} → {bundle.out_channels} channel(s) ({', '.join(bundle.classes)}), "
        f"divisor {bundle.divisor}, receptive field {bundle.receptive_field} px, tile {bundle.tile} / overlap {bundle.overlap}, "
        f"runs on {', '.join(bundle.backends)}"
    )
    typer.echo(str(bundle.path))


def check_output(out: Path, *, overwrite: bool) -> None:
    """Refuse, in one line and before any work, a bundle folder that exists (without --overwrite),
    a file in its place, or a folder that cannot be written."""
    from ..errors import OutputExistsError
    from ..storage import check_writable

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; give -o a folder for the engine bundle, e.g. engines/NAME")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; choose another -o or pass --overwrite to replace it")
    check_writable(out)


def export_engine(
    engine: str = typer.Argument(..., help="Engine bundle name or folder."),
    out: Path = typer.Option(..., "--out", "-o", help="The package to write, e.g. NAME.zip."),
    bioimageio: bool = typer.Option(False, "--bioimageio", help="Write a bioimage.io model package (the only format so far)."),
    license: str = typer.Option("MIT", "--license", help="SPDX licence of the weights, for the package."),
    author: list[str] = typer.Option(["tilefeet"], "--author", help="Author name(s) for the package."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Export an engine bundle as a bioimage.io model package (validated with bioimageio.spec)."""
    from ..errors import ConfigError

    if not bioimageio:
        raise ConfigError("say which format to export: --bioimageio (a bioimage.io model package .zip)")
    from ..bioimageio import export_package

    typer.echo(str(export_package(engine, out, authors=tuple(author), license=license, overwrite=overwrite)))
