"""`moevl info` and `moevl doctor`, as argparse sub-commands the `moevl` entry point adds.

Each handler takes the parsed args and returns the process exit code.
"""

from __future__ import annotations

import argparse
import json

from moevl.ascend.doctor import exit_code, format_report, report_dict, run_checks
from moevl.ascend.info import collect_info, format_info


def run_info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.json:
        print(json.dumps(report_dict(checks, strict=args.strict), indent=2))
    else:
        print(format_report(checks, strict=args.strict))
    return exit_code(checks, strict=args.strict)


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("info", help="show versions, devices and what --device auto picks")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run_info)
    return parser


def add_doctor_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="check the Ascend stack (CANN, driver, npu-smi, torch-npu, ATC, onnxruntime-cann)",
        description="Exit 0 unless the installed Ascend stack is inconsistent; a host without any NPU passes. "
        "With --strict, also fail on warnings or when no NPU is found.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings or when no NPU is found")
    parser.set_defaults(func=run_doctor)
    return parser
