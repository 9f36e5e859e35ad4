"""ReconciliationWorkflow: one provider's settlement for one day, matched and repaired.

load the bill (replacing what an earlier run of the day loaded) -> classify its rows in
batches -> find our paid payments the bill lacks -> repair each difference through the
payment and refund workflows -> verify: a repair is resolved once our database shows the
money agreeing with the bill (also checked at the start of a later run of the day) -> the
report (and an alert when too many differences stay unresolved). One failing day of the
scheduled catch-up does not stop the others. Each stage works in bounded
batches; the workflow continues as new before its history grows large. A Temporal
Schedule starts it daily for yesterday and catches up days without a finished run;
`paysentinel reconcile run --date` starts it for any day. Running a day again repairs
nothing twice: differences are stored once, and every repair is idempotent.
"""

from __future__ import annotations

from datetime import timedelta
from typing import cast

from temporalio import workflow
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
)
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from paysentinel.temporal import ensure_schedule
    from activities.reconcile import ReconciliationActivities
    from paysentinel.config import Settings
    from paysentinel.models import (
        IncidentInput,
        ReconcileInput,
        ReconcileReport,
        ReconcileStep,
        RunFailure,
        StepResult,
    )
    from workflows.common import alert_once, cause

RECONCILE_SCHEDULE_ID = "paysentinel-reconcile"  # the simulator's; a real provider's adds "-<provider>"


def reconcile_schedule_id(provider: str) -> str:
    return RECONCILE_SCHEDULE_ID if provider == "simulator" else f"{RECONCILE_SCHEDULE_ID}-{provider}"


# Patches (kept histories of earlier releases replay without them).
VERIFY_PATCH = "reconcile-verify-repairs"  # a verification stage after repair and at the start of a run
VERIFY_WAIT_PATCH = "reconcile-verify-waits"  # then wait, on a backoff, for repairs to show in our books
CATCHUP_PATCH = "reconcile-catchup-survives-a-failed-day"  # one day's failure no longer stops the others
BATCHES_PER_RUN = 20  # then continue as new, so a 100,000-row day keeps a short history
STEP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=60), maximum_attempts=8)


def reconcile_workflow_id(provider: str, day) -> str:
    return f"reconcile-{provider}-{day}"


@workflow.defn
class ReconciliationWorkflow:
    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileReport | list[str]:
        if input.day is None:
            return await self._scheduled(input)
        try:
            return await self._reconcile(input)
        except ActivityError as err:
            # A bill that cannot be read, or a step that kept failing: say so, then fail visibly.
            error = cause(err)
            await self._call(
                ReconciliationActivities.fail_run,
                RunFailure(provider=input.provider, day=input.day, error=error),
                "record the failure",
            )
            await alert_once(self._failure(input, error), "the run failed")
            raise ApplicationError(f"reconciliation of {input.day} failed: {error}", non_retryable=True) from err

    async def _reconcile(self, input: ReconcileInput) -> ReconcileReport:
        step = ReconcileStep(provider=input.provider, day=input.day, after=input.cursor, limit=input.batch_rows)
        batches = 0
        verifying = workflow.patched(VERIFY_PATCH)
        if input.stage == "load":
            await self._call(ReconciliationActivities.start_run, step, f"start reconciling {input.day}")
            if verifying:  # what earlier runs of the day repaired, resolved once the money agrees
                await self._verify_all(step, "verify earlier repairs")
            loaded: StepResult = await workflow.execute_activity_method(
                ReconciliationActivities.load_bill,
                step,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=60),
                retry_policy=STEP_RETRY,
                summary=f"load the {input.provider} bill of {input.day}",
            )
            workflow.logger.info("reconciliation %s: %d bill rows", input.run_id, loaded.handled)
            input, step = self._next(input, "classify"), step.model_copy(update={"after": 0})
        stages = [
            ("classify", ReconciliationActivities.classify, "match bill rows"),
            ("missing", ReconciliationActivities.find_missing, "find paid payments the bill lacks"),
            ("repair", ReconciliationActivities.repair, "repair differences"),
        ]
        if verifying:
            stages.append(("verify", ReconciliationActivities.verify, "verify repairs"))
        for stage, activity, what in stages:
            if input.stage != stage:
                continue
            while True:
                result: StepResult = await self._call(activity, step, f"{what} after #{step.after}")
                step = step.model_copy(update={"after": result.last})
                batches += 1
                if result.done:
                    break
                if batches >= BATCHES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                    workflow.continue_as_new(input.model_copy(update={"cursor": result.last}))
            following = {
                "classify": "missing",
                "missing": "repair",
                "repair": "verify" if verifying else "finish",
                "verify": "finish",
            }[stage]
            input, step = self._next(input, following), step.model_copy(update={"after": 0})
        if verifying and workflow.patched(VERIFY_WAIT_PATCH):
            await self._await_repairs(input, step)
        report: ReconcileReport = await self._call(ReconciliationActivities.finish, step, "write the report")
        await self._alert(input, report)
        return report

    async def _verify_all(self, step: ReconcileStep, what: str) -> None:
        checked = step.model_copy(update={"after": 0})
        while True:
            result: StepResult = await self._call(ReconciliationActivities.verify, checked, f"{what} after #{checked.after}")
            checked = checked.model_copy(update={"after": result.last})
            if result.done:
                return

    async def _await_repairs(self, input: ReconcileInput, step: ReconcileStep) -> None:
        """Refunds and payment workflows act within seconds or minutes: wait for them (up to
        ``verify_wait_seconds``, on a backoff) so the report counts what is really resolved."""
        waited, delay = 0.0, 2.0
        while waited < input.verify_wait_seconds:
            waiting: int = await self._call(ReconciliationActivities.count_waiting, step, "repairs still waiting")
            if not waiting:
                return
            delay = min(delay, input.verify_wait_seconds - waited)
            await workflow.sleep(delay, summary=f"{waiting} repair(s) waiting for the money; verify again in {delay:g}s")
            waited, delay = waited + delay, min(delay * 2, 60.0)
            await self._verify_all(step, "verify repairs again")

    def _next(self, input: ReconcileInput, stage: str) -> ReconcileInput:
        return input.model_copy(update={"stage": stage, "cursor": 0})

    async def _call(self, activity, arg, summary: str):
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=timedelta(minutes=5),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=STEP_RETRY,
            summary=summary,
        )

    def _failure(self, input: ReconcileInput, error: str | None) -> IncidentInput:
        return IncidentInput(
            monitor=f"reconcile:{input.provider}",
            kind=f"failed:{input.day}",
            breach=error is not None,
            rate=0,
            threshold=0,
            payments=0,
            detail=error or "",
        )

    async def _alert(self, input: ReconcileInput, report: ReconcileReport) -> None:
        """One alert per day when more differences than the threshold stay unresolved."""
        open_kinds = ", ".join(f"{k} {c['unresolved']}" for k, c in report.classes.items() if c["unresolved"])
        await alert_once(
            IncidentInput(
                monitor=f"reconcile:{input.provider}",
                kind=f"unresolved:{input.day}",
                breach=report.unresolved > input.alert_threshold,
                rate=report.unresolved,
                threshold=input.alert_threshold,
                payments=report.rows,
                detail=f"{report.unresolved} of the differences found on {input.day} need a person ({open_kinds}); "
                f"{report.rows} bill rows, {report.matched} matched",
            ),
            f"{report.unresolved} unresolved differences",
        )
        await alert_once(self._failure(input, None), "an earlier failure of the day")  # now over

    async def _scheduled(self, input: ReconcileInput) -> list[str]:
        """Yesterday, and every missed day of the catch-up window, one child run each."""
        days = await workflow.execute_activity_method(
            ReconciliationActivities.days_to_reconcile,
            input.catchup_days,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=STEP_RETRY,
            summary="days to reconcile",
        )
        done = []
        for day in days:
            try:
                report = await workflow.execute_child_workflow(
                    ReconciliationWorkflow.run,
                    input.model_copy(update={"day": day}),
                    id=reconcile_workflow_id(input.provider, day),
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    static_summary=f"Reconcile {input.provider} {day}",
                )
            except ChildWorkflowError as err:
                if not workflow.patched(CATCHUP_PATCH):
                    raise
                # The day's run recorded and alerted its failure; the next run of the schedule tries it again.
                error = str(err.cause) if err.cause is not None else str(err)
                workflow.logger.warning("reconciliation of %s failed: %s; the other days go on", day, error)
                done.append(f"{day}: failed: {error}")
                continue
            day_report = cast(ReconcileReport, report)  # a day's run returns its report
            done.append(f"{day}: {day_report.rows} rows, {day_report.unresolved} unresolved")
        return done


def reconcile_input(settings: "Settings", provider: str = "simulator") -> ReconcileInput:
    return ReconcileInput(
        provider=provider,
        catchup_days=settings.reconcile_catchup_days,
        batch_rows=settings.reconcile_batch_rows,
        alert_threshold=settings.reconcile_alert_threshold,
        verify_wait_seconds=settings.reconcile_verify_wait_seconds,
    )


def reconcile_schedule(input: ReconcileInput, at: str, time_zone: str, task_queue: str) -> Schedule:
    hour, minute = (int(part) for part in at.split(":"))
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ReconciliationWorkflow.run,
            input,
            id="reconcile-daily" if input.provider == "simulator" else f"reconcile-daily-{input.provider}",
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(
            calendars=[ScheduleCalendarSpec(hour=[ScheduleRange(hour)], minute=[ScheduleRange(minute)])],
            time_zone_name=time_zone,
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(days=1)),
    )


async def ensure_reconcile_schedule(client: Client, input: ReconcileInput, at: str, time_zone: str, task_queue: str) -> None:
    schedule = reconcile_schedule(input, at, time_zone, task_queue)
    await ensure_schedule(client, reconcile_schedule_id(input.provider), schedule)
