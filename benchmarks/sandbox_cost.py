"""Benchmark: what the workflow sandbox costs per payment it starts or replays.

Creates sandboxed PaymentWorkflow instances, as the worker does for each payment it starts
or replays after an eviction, with the worker's own sandbox settings, and prints the time
and memory per instance: the workflow modules compiled from source each time (no bytecode,
as under PYTHONDONTWRITEBYTECODE), loaded from bytecode, and passed through the sandbox
(PAYSENTINEL_WORKER_SANDBOX=shared). Each variant runs in a fresh interpreter.

    python benchmarks/sandbox_cost.py [--instances 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "isolated, compiled from source": ("isolated", None),
    "isolated, bytecode kept": ("isolated", "bytecode"),
    "shared, bytecode kept": ("shared", "bytecode"),
}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def measure(sandbox: str, count: int) -> tuple[float, float]:
    from temporalio import converter, workflow
    from temporalio.api.common.v1.message_pb2 import Payloads
    from temporalio.api.failure.v1.message_pb2 import Failure
    from temporalio.worker._workflow_instance import WorkflowInstanceDetails
    from temporalio.worker.workflow_sandbox import _runner

    from workers.main import workflow_runner
    from workflows.payment import PaymentWorkflow

    runner = workflow_runner(sandbox)
    defn = workflow._Definition.must_from_class(PaymentWorkflow)

    def details() -> WorkflowInstanceDetails:
        return WorkflowInstanceDetails(
            payload_converter_factory=converter.DataConverter.default._new_payload_converter,
            failure_converter_class=converter.DataConverter.default.failure_converter_class,
            interceptor_classes=[],
            defn=defn,
            info=_runner._fake_info,
            randomness_seed=-1,
            extern_functions={},
            disable_eager_activity_execution=False,
            worker_level_failure_exception_types=[],
            patch_activation_callback=None,
            last_completion_result=Payloads(),
            last_failure=Failure(),
        )

    runner.create_instance(details())  # the first one writes the bytecode, where it is kept
    gc.collect()
    before = rss_kib()
    started = time.perf_counter()
    kept = [runner.create_instance(details()) for _ in range(count)]
    elapsed = (time.perf_counter() - started) / count
    gc.collect()
    grown = (rss_kib() - before) / count
    del kept
    return elapsed, grown


def child(sandbox: str, bytecode: str | None, count: int) -> None:
    sys.path.insert(0, str(ROOT))
    if bytecode:
        sys.pycache_prefix, sys.dont_write_bytecode = bytecode, False
    else:
        sys.dont_write_bytecode = True
        sys.pycache_prefix = tempfile.mkdtemp()  # an empty cache: nothing compiled is found
    elapsed, grown = asyncio.run(measure(sandbox, count))
    print(f"{elapsed * 1000:.1f} {grown:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sandbox, bytecode = args.child
        child(sandbox, None if bytecode == "-" else bytecode, args.instances)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from system import header

    header(f"sandbox cost: {args.instances} sandboxed PaymentWorkflow instances per variant")
    cache = tempfile.mkdtemp(prefix="paysentinel-bytecode-")
    results = {}
    for name, (sandbox, bytecode) in VARIANTS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--instances", str(args.instances), "--child", sandbox, cache if bytecode else "-"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        ms_each, kib_each = (float(v) for v in out.stdout.split()[-2:])
        results[name] = ms_each
        print(f"{name}: {ms_each:.1f} ms and {kib_each:.0f} KiB per instance", flush=True)
    source, kept = results["isolated, compiled from source"], results["isolated, bytecode kept"]
    print(
        f"compiled from source / bytecode kept: x{source / kept:.1f}; "
        f"isolated / shared (bytecode kept): x{kept / results['shared, bytecode kept']:.1f}"
    )


if __name__ == "__main__":
    main()
