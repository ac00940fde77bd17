"""Command line: `python -m data_prep {train-tokenizer,build,build-sharded,submit-build,merge,verify} ...`."""

import argparse
import json
import sys

from data_prep.corpus import DataPrepError

INPUTS = "corpus files or globs (.txt[.gz], .json[l][.gz], .parquet, .arrow) or hf:<dataset>[:<config>][@<split>]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with EOS and mask tokens")
    train.add_argument("--input", nargs="+", required=True, help=INPUTS)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="directory to save the HF tokenizer files in")

    build = commands.add_parser("build", help="tokenize a corpus into a Megatron <prefix>.bin/.idx dataset")
    build.add_argument("--input", nargs="+", required=True, help=INPUTS)
    build.add_argument("--tokenizer", required=True, help="local tokenizer directory or HF hub name")
    build.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    build.add_argument("--text-field", default="text", help="document field of json/parquet/arrow/hf: records")
    build.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    build.add_argument("--overwrite", action="store_true", help="rebuild even if a valid dataset exists")

    sharded = commands.add_parser(
        "build-sharded", help="tokenize a corpus into <prefix>.shard-NNNNN.bin/.idx, keeping shards that verify (resume)"
    )
    sharded.add_argument("--input", nargs="+", required=True, help=INPUTS)
    sharded.add_argument("--tokenizer", required=True, help="local tokenizer directory or HF hub name")
    sharded.add_argument("--output-prefix", required=True, help="writes <prefix>.shard-00000.bin/.idx, ...")
    sharded.add_argument("--documents-per-shard", type=int, required=True)
    sharded.add_argument("--text-field", default="text", help="document field of json/parquet/arrow/hf: records")
    sharded.add_argument("--workers", type=int, default=1, help="tokenizer processes")

    submit = commands.add_parser(
        "submit-build", help="on a SLURM cluster: one array task per input into <prefix>.part-NNNNN, then a merge job"
    )
    submit.add_argument("--input", nargs="+", required=True, help=INPUTS + ", one array task each")
    submit.add_argument("--tokenizer", required=True, help="tokenizer directory (on a filesystem the nodes share)")
    submit.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    submit.add_argument("--text-field", default="text", help="document field of json/parquet/arrow/hf: records")
    submit.add_argument("--workers", type=int, default=1, help="tokenizer processes per task")
    submit.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    submit.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default: --workers)")
    submit.add_argument("--time-limit-minutes", type=int, default=60, help="per task, and for the merge")
    submit.add_argument("--array-parallelism", type=int, default=64, help="array tasks running at once, at most")
    submit.add_argument("--log-folder", help="submitit's files and the logs (default: <prefix>.slurm/)")
    submit.add_argument("--wait", action="store_true", help="wait; print the job ids, then the merged data's summary")

    merge = commands.add_parser("merge", help="concatenate shard datasets, in the order given, into <prefix>.bin/.idx")
    merge.add_argument("--shards", nargs="+", required=True, help="shard prefixes (without .bin/.idx)")
    merge.add_argument("--output-prefix", required=True)

    verify = commands.add_parser("verify", help="check a <prefix>.bin/.idx dataset and print a JSON summary")
    verify.add_argument("prefix")

    args = parser.parse_args(argv)
    # Imported here so `--help` and argument errors stay instant (megatron/torch load slowly).
    try:
        if args.command == "train-tokenizer":
            from data_prep.tokenizer import train_bpe_tokenizer

            tokenizer = train_bpe_tokenizer(args.input, args.vocab_size, args.out)
            summary = {"out": args.out, "vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
        elif args.command == "build":
            from data_prep.build import build_indexed_dataset
            from data_prep.tokenizer import load_tokenizer

            summary = build_indexed_dataset(
                args.input,
                load_tokenizer(args.tokenizer),
                args.output_prefix,
                text_field=args.text_field,
                workers=args.workers,
                overwrite=args.overwrite,
            )
        elif args.command == "build-sharded":
            from data_prep.shards import build_sharded
            from data_prep.tokenizer import load_tokenizer

            summary = build_sharded(
                args.input,
                load_tokenizer(args.tokenizer),
                args.output_prefix,
                args.documents_per_shard,
                text_field=args.text_field,
                workers=args.workers,
            )
        elif args.command == "submit-build":
            from data_prep.slurm_array import submit_build, wait_for_build

            build = submit_build(
                args.input,
                args.tokenizer,
                args.output_prefix,
                text_field=args.text_field,
                workers=args.workers,
                partition=args.partition,
                cpus_per_task=args.cpus_per_task,
                time_limit_minutes=args.time_limit_minutes,
                array_parallelism=args.array_parallelism,
                log_folder=args.log_folder,
            )
            summary = {
                "array_job": build.array_job_id,
                "merge_job": build.merge_job.job_id,
                "parts": build.parts,
                "logs": build.log_folder,
            }
            if args.wait:
                print(json.dumps(summary), flush=True)  # the job ids, before the wait
                summary = wait_for_build(build)
        elif args.command == "merge":
            from data_prep.shards import merge_shards

            summary = merge_shards(args.shards, args.output_prefix)
        else:
            from data_prep.verify import verify_indexed_dataset

            summary = verify_indexed_dataset(args.prefix)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
