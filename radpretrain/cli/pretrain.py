"""`radpretrain pretrain CONFIG [key=value ...]` and `radpretrain export RUN OUT [--format hf|onnx]`."""

from __future__ import annotations

import argparse

from radpretrain.cli.args import add_config_arguments, split_config_arguments

PRETRAIN_HELP = """\
Pretrain an encoder on shards with the pretext tasks of CONFIG (YAML; see configs/pretrain/), each
`key=value` overriding one value (e.g. steps=2000 optim.lr=3e-4 tasks="{simclr: 1.0, metadata: 0.5}").
Writes OUT (the config's `out`): config.yaml (resolved), log.jsonl and tensorboard/ (loss terms, lr,
images/s), checkpoint/ (every `checkpoint_every` steps and on SIGTERM/Ctrl-C), summary.json (kNN and
linear probes of body part and age bucket on the val split).

One process per GPU on one or many nodes with Accelerate:
  accelerate launch --multi_gpu --num_processes 8 -m radpretrain pretrain CONFIG
(`accelerate launch --cpu --num_processes N` starts one process; on a CPU-only machine use --multi_gpu
or `torchrun --nproc_per_node N -m radpretrain pretrain CONFIG`, which run N gloo processes.)
data.batch_size is per process. A stopped run continues exactly with --resume.
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain an encoder on shards (self-supervised pretext tasks)",
        description=PRETRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(pretrain)
    pretrain.add_argument(
        "--resume", action="store_true", help="continue the run in `out` from its last checkpoint (same as resume=true)"
    )
    pretrain.set_defaults(func=_run_pretrain)

    export = sub.add_parser(
        "export",
        help="export a run's encoder (radpretrain folder, Hugging Face / timm folder, or ONNX)",
        description=(
            "Write the encoder of the pretraining run RUN (its `out` folder) to OUT. --format radpretrain "
            "(default): encoder.safetensors, encoder.json (timm name, input size, intensity convention, tasks, "
            "steps, data counts, probe scores) and a model card README.md; load it with "
            "radpretrain.load_encoder(OUT). --format hf: a Hugging Face / timm folder (model.safetensors, "
            'config.json, encoder.json, README.md with hub metadata); load it with timm.create_model("local-dir:OUT", '
            "pretrained=True) or radpretrain.load_encoder(OUT), upload it with --push-to-hub ORG/NAME. --format "
            "onnx: the radpretrain folder plus encoder.onnx (input 'image' (B, 1, S, S), output 'features', any "
            "batch size), checked against torch with onnxruntime. hf, onnx and --push-to-hub need "
            "pip install 'radpretrain[export]'."
        ),
    )
    export.add_argument("run", help="the `out` folder of a `radpretrain pretrain` run")
    export.add_argument("out", help="folder to write the encoder to (outside RUN)")
    export.add_argument(
        "--format",
        default="radpretrain",
        metavar="{radpretrain,hf,onnx}",
        help="output format (default: radpretrain)",
    )
    export.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="upload the hf folder to this Hugging Face hub repo (e.g. my-team/chest-encoder; token from HF_TOKEN)",
    )
    export.add_argument("--private", action="store_true", help="create the hub repo as private (with --push-to-hub)")
    export.add_argument(
        "--license", default="other", help="hub license id written into the model card (default: other)"
    )
    export.set_defaults(func=_run_export)


def _run_pretrain(args: argparse.Namespace) -> int:
    from radpretrain.config import load_config
    from radpretrain.pretrain.config import PretrainConfig
    from radpretrain.pretrain.loop import pretrain

    path, overrides = split_config_arguments(args)
    if args.resume:
        overrides.append("resume=true")
    result = pretrain(load_config(PretrainConfig, path, overrides))
    if result.main:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in result.probe.items() if k.startswith(("knn", "linear")))
        print(f"step {result.step}: run in {result.run_dir}" + (f"; probes: {scores}" if scores else ""))
    if result.stopped_by is not None:
        if result.main:
            print(f"stopped by {result.stopped_by.name}; checkpoint saved; rerun with --resume to continue")
        # 128 + signal number, as a shell reports a process ended by that signal: the run is not finished.
        return 128 + int(result.stopped_by)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from radpretrain.models.export import export

    result = export(
        args.run, args.out, format=args.format, push_to_hub=args.push_to_hub, private=args.private, license=args.license
    )
    print(f"encoder written to {result.out} ({', '.join(result.files)})")
    if result.onnx_max_diff is not None:
        print(f"onnxruntime matches torch within {result.onnx_max_diff:.2g} on a test batch")
    if result.pushed_to is not None:
        print(f"uploaded to {result.pushed_to}")
    return 0
