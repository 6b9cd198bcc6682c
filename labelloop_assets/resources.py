"""Resources: where the loop keeps its state, and the DuckDB connection to it."""

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field

from labelloop_assets.core import lake, store, train
from labelloop_assets.core.bursts import BurstPolicy
from labelloop_assets.core.evaluation import ValidationPlan
from labelloop_assets.core.external import trainer_environment
from labelloop_assets.core.lake import Lake, LakeError
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_assets.core.settings import (
    Home,
    LabelloopConfigError,
    MonitoringSettings,
    RetrainPolicy,
    load_yaml_mapping,
    pseudonymization_key,
)
from labelloop_assets.core.tasks import TaskSettings

HOME_ENV = "LABELLOOP_HOME"

# The homes and database files this process's Definitions were bound to explicitly
# (`build_definitions(home=...)`: tests, benchmarks, the demo). The deployment's own home is not
# listed: `definitions.defs` reads LABELLOOP_HOME through `dg.EnvVar` when a run or a sensor
# starts, and `_deployment_home` reads the same variable to judge a run's config. Resource fields
# are run config in Dagster (the launchpad, GraphQL and `-c` can set them), so a run naming any
# other folder or file is refused: a run must not be able to bring its own policies, store or models.
_BOUND_HOMES: set[Path] = set()
_BOUND_DATABASES: set[str] = set()


class RunConfigRefused(dg.Failure):
    """A run's config tried to move the home or the store away from the deployment's."""


class HomeNotConfigured(dg.Failure):
    """LABELLOOP_HOME is not set where a run or a sensor needs the home."""


NO_HOME = (
    "LABELLOOP_HOME is not set: set it, in the environment of the Dagster processes (webserver, "
    "daemon, run workers), to the folder that holds labelloop's landing zone, store and models"
)


def _deployment_home() -> Path | None:
    """The deployment's LABELLOOP_HOME, read now (never at import), or None when unset."""
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).resolve() if value else None


def _bound_root(root: str) -> Path:
    resolved = home_root(root)
    deployment = _deployment_home()
    allowed = _BOUND_HOMES | ({deployment} if deployment else set())
    if resolved not in allowed:
        raise RunConfigRefused(
            description=(
                f"refused: this run's config points labelloop at {resolved}, but the deployment's "
                f"LABELLOOP_HOME is {', '.join(sorted(str(p) for p in allowed)) or 'not set'}. "
                "The home (and with it the policies, the store and the models) is fixed by the "
                "deployment's environment; a run's config cannot move it."
            )
        )
    return resolved


def home_root(root: str) -> Path:
    """The folder a resource names, resolved; a clear failure when LABELLOOP_HOME was set empty."""
    if not root.strip():
        raise HomeNotConfigured(description=NO_HOME)
    # Stripped as the deployment's own value is (`_deployment_home`), so the two compare equal.
    return Path(root.strip()).resolve()


class LabelloopHome(dg.ConfigurableResource):
    """The `LABELLOOP_HOME` folder: landing zone, models, reports and configuration.

    `root` is the deployment's LABELLOOP_HOME, read when a run or a sensor starts
    (`build_resources`); a run whose config changes it fails.
    """

    root: str = Field(description="The deployment's LABELLOOP_HOME; a run's config cannot change it.")

    def home(self) -> Home:
        return Home(_bound_root(self.root)).ensure()

    def ontology(self) -> Ontology:
        return Ontology.load(self.home().ontology_file)

    def policy(self) -> ResolutionPolicy:
        return ResolutionPolicy.load(self.home().governance_file)

    def bursts(self) -> BurstPolicy:
        path = self.home().governance_file
        return BurstPolicy.from_governance(load_yaml_mapping(path, "governance"), f"governance file {path}")

    def monitoring(self) -> MonitoringSettings:
        return MonitoringSettings.load(self.home().monitoring_file)

    def validation_plan(self) -> ValidationPlan:
        return ValidationPlan.load(self.home().validation_file)

    def training(self) -> train.TrainingConfig:
        return train.TrainingConfig.load(self.home().training_file)

    def review_tasks(self) -> TaskSettings:
        return TaskSettings.load(self.home().review_tasks_file)

    def secret(self) -> bytes:
        return pseudonymization_key()


@contextmanager
def open_store(
    database: DuckDBResource, groups: tuple[str, ...] | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the store with labelloop's schema in place, closed when the block ends.

    On the lake, `groups` names the table groups this step writes (default: its asset's group).
    The store is the resource's DuckDB file, or the lake when LABELLOOP_CATALOG is set (the
    deployment's environment decides, not a run's config). While another writer holds the store
    the step waits (LABELLOOP_DB_WAIT_SECONDS, logged); past that it fails with a message naming
    the holder. The resource's own connect is not used: its retries take up to 100 s, cannot be
    configured, and end in DuckDB's raw error.
    """
    logger = dg.get_dagster_logger()
    # A run's config replaces the resource's whole config: an empty home_root then means the
    # database's folder, or else the deployment's LABELLOOP_HOME; either must be a bound home.
    named_root = getattr(database, "home_root", "")
    deployment = _deployment_home()
    root = named_root or (str(Path(database.database).parent) if database.database else str(deployment or ""))
    allowed_files = _BOUND_DATABASES | {
        str(Home(Path(r).resolve()).database_file) for r in (named_root, deployment) if r
    }
    if (database.database and database.database not in allowed_files) or database.connection_config:
        raise RunConfigRefused(
            description=(
                f"refused: this run's config sets the database resource to {database.database!r}"
                f"{' with connection_config ' + repr(database.connection_config) if database.connection_config else ''}"
                "; "
                "the store is fixed by the deployment (LABELLOOP_HOME, LABELLOOP_CATALOG), not by a run"
            )
        )
    file = Path(database.database) if database.database else Home(_bound_root(root)).database_file
    _bound_root(str(file.parent))
    try:
        con = store.connect(
            Lake.from_env(file.parent) or file, config=database.connection_config, on_wait=logger.warning,
            groups=groups or _table_groups(),
        )
    except (store.DatabaseBusy, store.NewerDatabaseFile, LakeError, LabelloopConfigError) as error:
        raise dg.Failure(description=f"labelloop cannot open its database: {error}") from None
    # Closed on failure too: a failed step must not leave the store held by this process.
    with con:
        yield con


# The lake's table group each asset group writes (core/lake.py); anything else takes them all.
TABLE_GROUP_OF = {"ingest": "intake", "curation": "curation", "training": "training", "monitoring": "monitoring"}


def _table_groups() -> tuple[str, ...]:
    """The table group of the asset being materialized, so that writers of other groups (another
    worker's ingest while this one curates) go on at the same time."""
    try:
        context = dg.AssetExecutionContext.get()
        group = context.assets_def.group_names_by_key[context.asset_key]
    except Exception:  # a direct invocation, or no single asset: every group
        return lake.ALL_GROUPS
    return (TABLE_GROUP_OF[group],) if group in TABLE_GROUP_OF else lake.ALL_GROUPS


class LabelloopStore(DuckDBResource):
    """The store: `labelloop.duckdb` in the home, or the lake when LABELLOOP_CATALOG is set.

    `home_root` is the deployment's LABELLOOP_HOME, read when a run starts; `database` is left
    empty for the home's own file. A run whose config names another home or file fails.
    """

    home_root: str = Field(default="", description="The deployment's LABELLOOP_HOME; a run's config cannot change it.")
    database: str = Field(
        default="", description="Empty: the home's labelloop.duckdb. A run naming another file is refused."
    )


class RetrainCadence(dg.ConfigurableResource):
    """How many promoted label changes, and how long a pause, before the next training.

    Unset fields follow LABELLOOP_RETRAIN_MIN_CHANGES and LABELLOOP_RETRAIN_MIN_INTERVAL_SECONDS,
    read when the sensor evaluates (defaults 50 changes, one hour).
    """

    min_label_changes: int | None = None
    min_interval_seconds: float | None = None

    def policy(self) -> RetrainPolicy:
        deployment = RetrainPolicy.from_env()
        return RetrainPolicy(
            deployment.min_label_changes if self.min_label_changes is None else self.min_label_changes,
            deployment.min_interval_seconds if self.min_interval_seconds is None else self.min_interval_seconds,
        )


class TrainerRunFailed(RuntimeError):
    """The external trainer exited with an error or ran past its time; the message says which."""


class TrainerSubprocessClient(dg.PipesSubprocessClient):
    """Dagster's subprocess Pipes client with what an external trainer needs besides: a deadline
    (training.yaml's `timeout_seconds`: past it the trainer is stopped) and the last lines of its
    error output in the failure, so a run that fails says why. Its output is still forwarded.

    The training step calls `run(context=..., command=..., extras=..., cwd=...)`; any other Pipes
    client (Kubernetes, Docker, Databricks) bound to the `trainer_client` resource is called with
    `context`, `command` and `extras` only."""

    TAIL_LINES = 20

    def run(  # the parent's keywords, plus timeout_seconds
        self,
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        extras: dict | None = None,
        command: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_seconds: float | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        with dg.open_pipes_session(
            context=context, context_injector=self.context_injector, message_reader=self.message_reader,
            extras=extras,
        ) as session:
            process = subprocess.Popen(
                command, cwd=cwd or self.cwd, stderr=subprocess.PIPE,
                env={**trainer_environment(os.environ), **self.env, **(env or {}),
                     **session.get_bootstrap_env_vars()},
            )
            tail: deque[str] = deque(maxlen=self.TAIL_LINES)
            forwarding = threading.Thread(target=_forward, args=(process.stderr, tail, self.forward_stdio),
                                          daemon=True)
            forwarding.start()
            try:
                process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                self._stop(process)
                forwarding.join(timeout=5)
                raise TrainerRunFailed(f"it ran past timeout_seconds ({timeout_seconds:g} s) and was stopped") from None
            except dg.DagsterExecutionInterruptedError:
                if self.forward_termination:
                    context.log.info("[pipes] execution interrupted, sending SIGINT to the trainer")
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=self.termination_timeout_seconds)
                raise
            forwarding.join(timeout=5)
            if process.returncode != 0:
                said = "".join(tail).strip()
                raise TrainerRunFailed(
                    f"it exited with code {process.returncode}"
                    + (f"; the end of its error output:\n{said}" if said else " and wrote nothing to its error output")
                )
        return dg.PipesClientCompletedInvocation(session)

    def _stop(self, process: subprocess.Popen) -> None:
        process.terminate()
        try:
            process.wait(timeout=self.termination_timeout_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _forward(stream, tail: deque, forward: bool) -> None:
    """Copy the trainer's error output to this process's, keeping its last lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        tail.append(line)
        if forward:
            sys.stderr.write(line)
    stream.close()


def build_resources(
    home: Home | None = None, retrain: RetrainPolicy | None = None, trainer_client: dg.PipesClient | None = None,
) -> dict:
    """The resources of the deployment: bound to `home` when given (tests, the demo), else to
    LABELLOOP_HOME as the environment has it when a run or a sensor starts. Runs may not point
    them elsewhere. `trainer_client` runs an external trainer (default: TrainerSubprocessClient)."""
    if home is None:
        root = dg.EnvVar(HOME_ENV)
        labelloop, database = LabelloopHome(root=root), LabelloopStore(home_root=root)
    else:
        _BOUND_HOMES.add(home.root.resolve())
        _BOUND_DATABASES.add(str(home.database_file))
        labelloop = LabelloopHome(root=str(home.root))
        database = LabelloopStore(home_root=str(home.root), database=str(home.database_file))
    cadence = (
        RetrainCadence()
        if retrain is None
        else RetrainCadence(
            min_label_changes=retrain.min_label_changes, min_interval_seconds=retrain.min_interval_seconds
        )
    )
    # The external trainer's Pipes client (training.yaml `trainer`); bind another Pipes client to
    # this key to run the trainer on Kubernetes, Docker or Databricks.
    return {"labelloop": labelloop, "database": database, "retrain_cadence": cadence,
            "trainer_client": trainer_client or TrainerSubprocessClient()}
