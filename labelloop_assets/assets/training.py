"""Training: a model fitted on the current corpus and evaluated on the frozen gold items."""

import json
import shutil
from datetime import UTC, datetime

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    config_errors_as_failures,
    labelloop_asset,
    run_id,
)
from labelloop_assets.checks.schema_checks import (
    blocking_checks_hold,
    failing_blocking_checks,
    markdown_table,
)
from labelloop_assets.core import (
    bursts,
    evaluation,
    external,
    gold,
    item_content,
    registry,
    reliability,
    store,
    train,
)
from labelloop_assets.core import release_notes as release
from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.pipelines import PipelineSpec
from labelloop_assets.core.settings import Home
from labelloop_assets.resources import LabelloopHome, TrainerSubprocessClient, open_store

# The frozen evaluation set: every model is scored on these, never trained on them.
GOLD_SQL = gold.GOLD_SQL
# The same corpus, configuration and training rows (gold copies left out) give the same model.
SAME_MODEL_SQL = (
    "SELECT * FROM models WHERE corpus_version = ? AND algorithm = ? AND params = ? AND train_data_hash = ? "
    "ORDER BY trained_at DESC LIMIT 1"
)
# The policy files whose hashes are recorded with a training and with an evaluation.
TRAINING_POLICIES = ("training.yaml", "validation.yaml")
EVALUATION_POLICIES = ("validation.yaml", "training.yaml")


# No automation_condition here: retrain_sensor launches training. Dagster's
# AutomationCondition.all_deps_blocking_checks_passed() would express the blocking-check hold (a
# failed upstream check also leaves production_corpus's own check unpassed, since the run skips
# it), but not the cadence: enough promoted label changes since the model's corpus version (read
# from materialization metadata), a minimum interval, no held correction burst. Declaring a
# condition would also let Dagster's automation sensor launch this asset alone, outside
# retrain_job and its evaluation. The step keeps its own guard below for manual runs.
@labelloop_asset(
    group="training",
    kinds={"scikit-learn", "duckdb"},
    code_version="1",
    deps=["production_corpus"],
)
def retrained_model(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource,
    trainer_client: dg.ResourceParam[dg.PipesClient],
) -> dg.MaterializeResult:
    """A challenger model trained on the current corpus (gold copies left out), stored under `models/<version>/` with its gold metrics."""  # noqa: E501 -- kept on one line: the docs' asset reference shows a description's first line
    home = labelloop.home()
    with config_errors_as_failures():
        config = labelloop.training()
        plan = labelloop.validation_plan()
        if config.trainer is not None:
            classes, folds = labelloop.ontology().labels, labelloop.monitoring().issues_folds
    with open_store(database) as con:
        content = item_content.home_content(con)
        if content is None:
            raise dg.Failure(description="no items yet: land items (or declare gold items) before training")
        if config.trainer is None:
            with config_errors_as_failures():
                spec = config.spec(content, f"training file {home.training_file}")
            algorithm, params = spec.algorithm, spec.recorded()
        else:
            # The team's own command trains (core/external.py); its command and script are the configuration.
            spec, algorithm, params = None, external.EXTERNAL, config.trainer.recorded(home.root)
        feature_length = store.get_state(con, item_content.LENGTH_KEY, 0) or None
        corpus_version, changes_total = store.corpus_head(con)
        corpus = store.frame(con, train.TRAINING_SQL)
        gold_items = store.frame(con, GOLD_SQL)
        evaluation_set = gold.current_evaluation_set(con)
        # Gold features never reach training: a corpus item that copies a gold item (under
        # another id, exactly or nearly) would let a model be scored on what it learned.
        copies = gold.find_gold_copies(corpus.select("item_id", "text", "features"), gold_items,
                                       plan.gold_copy_distance)
        if copies.copies.height:
            with store.transaction(con):
                newly = gold.record_copies(con, copies, run_id(context))
            context.log.warning(
                f"{copies.item_ids.len()} corpus item(s) copy a gold item ({_copy_counts(copies)}; "
                f"{newly} newly recorded in gold_copies): left out of training"
            )
        training = corpus.join(copies.copies.select("item_id").unique(), on="item_id", how="anti").sort("item_id")
        data_hash = train.training_data_hash(training)
        extra = {
            "evaluation_set": evaluation_set,
            "gold_copies_excluded": copies.item_ids.len(),
            "gold_copies": copies.counts(),
        }
        # One training per corpus version, configuration and training rows: the same inputs give
        # the same model.
        existing = store.frame(con, SAME_MODEL_SQL, [corpus_version, algorithm, params, data_hash])
        if existing.height:
            record = existing.to_dicts()[0]
            context.log.info(
                f"{record['model_version']} is already trained on corpus v{corpus_version}; reused"
            )
            return dg.MaterializeResult(metadata={**_model_metadata(home, record, _as_trained(home, record, extra)),
                                                  "reused": True})
        failing = failing_blocking_checks(context.instance)
        if failing:
            raise dg.Failure(
                description=f"training is held: {blocking_checks_hold(failing)}"
            )
        held = store.frame(con, "SELECT burst_id, reason FROM correction_bursts WHERE status = 'held'")
        if held.height:
            raise dg.Failure(
                description=f"training is held: {held.height} correction burst(s) await a reviewer "
                f"({', '.join(held['burst_id'].to_list())}); release or discard them with "
                "`labelloop review release|discard BURST_ID`",
                metadata={"held_bursts": dg.MetadataValue.md(markdown_table(held))},
            )
    if training.height < config.min_train_rows or training["label"].n_unique() < 2:
        raise dg.Failure(
            description=f"corpus v{corpus_version} has {training.height} labelled item(s) and "
            f"{training['label'].n_unique()} label(s) to train on ({extra['gold_copies_excluded']} gold "
            f"copies left out); training needs at least {config.min_train_rows} items (training.yaml "
            "min_train_rows) and two labels: land items with initial labels or corrections first. The "
            "champion is untouched."
        )
    if spec is None:
        # What an external trainer gets of the gold items: never their labels.
        trained = _run_trainer(context, trainer_client, home, config.trainer, training, gold_items.drop("label"),
                               _trainer_classes(classes, training), folds, corpus_version, content)
        model = train.ExternalModel(version="challenger", probabilities=trained["probabilities"],
                                    reference=trained["reference"])
        extra = {**extra, **{key: value for key, value in trained.items() if key != "probabilities"}}
    else:
        try:
            model = train.fit(training, training["label"].to_numpy(), spec, feature_length)
        except (ValueError, TypeError, ArithmeticError) as error:
            raise dg.Failure(
                description=f"training on corpus v{corpus_version} failed ({error}); the champion is untouched"
            ) from None
    scores = train.evaluate(model, gold_items, gold_items["label"].to_numpy())
    record = {
        "corpus_version": corpus_version,
        "n_train_rows": training.height,
        "n_classes": int(len(model.classes)),
        "algorithm": algorithm,
        "params": params,
        "train_data_hash": data_hash,
        "gold_accuracy": scores["accuracy"],
        "gold_macro_f1": scores["macro_f1"],
        "n_gold": gold_items.height,
        "label_changes_total": changes_total,
        "run_id": run_id(context),
    }
    # The file is not held while fitting, so another run may have trained meanwhile: the version is
    # numbered, and a model of the same corpus and configuration looked for again, only now, in
    # the transaction that registers it.
    with open_store(database) as con, store.transaction(con):
        rival = store.frame(con, SAME_MODEL_SQL, [corpus_version, algorithm, params, data_hash])
        if rival.height:
            record = rival.to_dicts()[0]
            context.log.info(f"{record['model_version']} was trained on corpus v{corpus_version} meanwhile; reused")
            return dg.MaterializeResult(metadata={**_model_metadata(home, record, _as_trained(home, record, extra)),
                                                  "reused": True})
        version = f"m{store.scalar(con, 'SELECT count(*) FROM models') + 1:04d}"
        record = {"model_version": version, **record}
        # metadata.json also names the evaluation set of its gold metrics and the copies left out.
        if spec is None:
            folder = train.save_external(trained["probabilities"], home.models / version, {**record, **extra})
        else:
            folder = train.save(model, home.models / version, {**record, **extra})
        record = {**record, "path": folder.relative_to(home.root).as_posix(),
                  "file_sha256": train.recorded_sha256(folder)}
        store.append(
            con,
            "models",
            pl.DataFrame([record]).with_columns(
                pl.col("gold_accuracy", "gold_macro_f1").fill_nan(None)
            ),
        )
        store.record_policies(con, run_id(context), "retrained_model", TRAINING_POLICIES)
    # A challenger: model_evaluation decides whether it replaces the champion.
    return dg.MaterializeResult(
        metadata={**_model_metadata(home, record, extra), "reused": False, "status": "challenger",
                  **({"trainer": external.EXTERNAL, "reference": extra["reference"]} if spec is None else {})}
    )


def _trainer_classes(ontology_labels: list[str], training: pl.DataFrame) -> list[str]:
    """The classes an external trainer is asked for: the ontology's labels, and any label the
    training rows still carry that the ontology no longer lists (sorted, as scikit-learn's are)."""
    return sorted({*map(str, ontology_labels), *training["label"].unique().to_list()})


def _run_trainer(
    context: dg.AssetExecutionContext, client: dg.PipesClient, home: Home, trainer: external.TrainerConfig,
    training: pl.DataFrame, gold_items: pl.DataFrame, classes: list[str], folds: int, corpus_version: int,
    content: str,
) -> dict:
    """Run the team's training command through Dagster Pipes and return its checked report:
    reference, metrics, command and the probabilities (a frame). Any failure fails the step."""
    command = trainer.argv()
    # One folder per run: the inputs are removed afterwards (the store is their record), the
    # output folder stays, since the trainer's model files live there.
    work = home.models / external.EXTERNAL / run_id(context)
    output_dir = work / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    training_path, gold_path = external.write_inputs(work / "input", training, gold_items)
    extras = {
        "corpus_version": corpus_version,
        "training_items": str(training_path),
        "gold_items": str(gold_path),
        "classes": classes,
        "folds": folds,
        "output_dir": str(output_dir),
        "item_content": content,
    }
    shown = " ".join(trainer.command)
    context.log.info(f"external trainer: {shown} ({training.height} training rows, {gold_items.height} gold items)")
    arguments = {"context": context, "command": command, "extras": extras}
    if isinstance(client, dg.PipesSubprocessClient):
        arguments["cwd"] = str(home.root)
    if isinstance(client, TrainerSubprocessClient):
        arguments["timeout_seconds"] = trainer.timeout_seconds
    try:
        invocation = client.run(**arguments)
        reported = {}
        for result in invocation.get_results(implicit_materializations=False):
            reported.update({key: getattr(value, "value", value) for key, value in (result.metadata or {}).items()})
        report = external.read_report(reported, output_dir)
        probabilities = external.check_probabilities(
            report.probabilities, classes, training["item_id"], gold_items["item_id"]
        )
    except external.TrainerOutputError as error:
        raise dg.Failure(
            description=f"the external trainer ({shown}) reported what labelloop cannot use: {error}; "
            "nothing registered, the champion is untouched"
        ) from None
    except Exception as error:  # the launch or the run failed, however the client says so
        raise dg.Failure(
            description=f"the external trainer ({shown}) failed: {error}; nothing registered, the champion is untouched"
        ) from None
    finally:
        shutil.rmtree(work / "input", ignore_errors=True)
    return {"probabilities": probabilities, "reference": report.reference, "command": list(trainer.command),
            "trainer_metrics": external.plain_metrics(report.metrics),
            "trainer_output": output_dir.relative_to(home.root).as_posix()}


def _as_trained(home: Home, record: dict, extra: dict) -> dict:
    """A reused model's gold metrics were measured on the evaluation set of its own training."""
    try:
        saved = json.loads((home.model_folder(record["path"]) / "metadata.json").read_text())
    except (OSError, ValueError):
        saved = {}
    return {**extra, "evaluation_set": saved.get("evaluation_set")}


def _copy_counts(copies: gold.GoldCopies) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in copies.counts().items())


def _model_metadata(home: Home, record: dict, extra: dict) -> dict:
    # NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
    import numpy as np
    return {
        "model_version": record["model_version"],
        "corpus_version": int(record["corpus_version"]),
        "label_changes_total": int(record["label_changes_total"]),
        "n_train_rows": int(record["n_train_rows"]),
        "gold_accuracy": round(float(np.nan_to_num(record["gold_accuracy"] or 0.0)), 4),
        "gold_macro_f1": round(float(np.nan_to_num(record["gold_macro_f1"] or 0.0)), 4),
        "n_gold": int(record["n_gold"]),
        "evaluation_set": extra["evaluation_set"] if extra["evaluation_set"] is not None else "none declared",
        "gold_copies_excluded": int(extra["gold_copies_excluded"]),
        "gold_copies": dg.MetadataValue.json(extra["gold_copies"]),
        "path": dg.MetadataValue.path(str(home.model_folder(record["path"]))),
    }


@labelloop_asset(
    group="training",
    kinds={"duckdb", "numpy"},
    code_version="1",
    deps=["production_corpus"],
)
def contributor_reliability(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Each contributor's estimated accuracy (one-coin Dawid-Skene anchored on reviewer-confirmed labels)."""
    with config_errors_as_failures():
        ontology, policy = labelloop.ontology(), labelloop.policy()
    with open_store(database) as con:
        votes = store.frame(
            con,
            f"SELECT item_id, user_pseudonym, corrected_label, label_before FROM ({bursts.COUNTED_VOTES_SQL}) "
            "QUALIFY row_number() OVER (PARTITION BY item_id, user_pseudonym "
            "ORDER BY created_at DESC, seq DESC) = 1",
        )
        anchors = store.frame(
            con, "SELECT item_id, label FROM production_corpus WHERE reviewer_confirmed"
        )
        corpus_version, _ = store.corpus_head(con)
        prior = reliability.ReliabilityPrior(policy.reliability_prior_mean, policy.reliability_prior_strength)
        estimates = reliability.estimate_reliability(votes, anchors, ontology.labels, prior)
        # Initial label sources are measured on the random audit only: reviewed items were
        # chosen because they were doubted (see core/reliability.py, "Selection").
        sources = reliability.stored_source_reliability(con, prior)
        rows = estimates.drop("iterations").with_columns(
            estimated_at=pl.lit(datetime.now(UTC)),
            corpus_version=pl.lit(corpus_version or None, pl.Int32),
        )
        store.replace(con, "contributor_reliability", rows)
    trusted = estimates.filter(
        (pl.col("accuracy") >= policy.solo_min_accuracy) & (pl.col("n_votes") >= policy.solo_min_votes)
    ).height
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": estimates.height,
            "contributors": estimates.height,
            "anchored_items": anchors.height,
            "trusted_to_flip_alone": trusted,
            "median_accuracy": dg.MetadataValue.float(
                float(estimates["accuracy"].median()) if estimates.height else 0.0
            ),
            "em_iterations": int(estimates["iterations"][0]) if estimates.height else 0,
            "audited_items": int(sources["n_audited"].sum()),
            "initial_label_sources": dg.MetadataValue.md(
                markdown_table(sources.with_columns(pl.col("accuracy", "standard_error").round(3)))
                if sources.height else "no audited items yet: send reviews of random items with source "
                "`audit_sample` (`labelloop review audit-sample` draws them)"
            ),
        }
    )


@labelloop_asset(
    group="training",
    kinds={"scikit-learn", "duckdb"},
    code_version="1",
    deps=[retrained_model],
)
def model_evaluation(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """The challenger against the champion, both scored on the current evaluation set; promoted only if not worse, with reasons."""  # noqa: E501 -- kept on one line: the docs' asset reference shows a description's first line
    import numpy as np
    with config_errors_as_failures():
        plan = labelloop.validation_plan()
        labelloop.training()  # read now, so that the hash recorded with the decision is today's file
    home = labelloop.home()
    with open_store(database) as con:
        challenger = store.frame(
            con, "SELECT * FROM models WHERE status = 'challenger' ORDER BY trained_at DESC LIMIT 1"
        ).to_dicts()
        champion = store.frame(con, "SELECT * FROM models WHERE status = 'champion' LIMIT 1").to_dicts()
        # Both models are scored on the current evaluation set, whatever set their stored scores
        # were measured on: a comparison across two sets would compare the sets, not the models.
        evaluation_set = gold.current_evaluation_set(con)
        gold_items = store.frame(con, GOLD_SQL)
        champion_set = store.scalar(
            con, "SELECT evaluation_set FROM model_evaluations WHERE champion = $m OR "
            "(challenger = $m AND decision = 'promote') ORDER BY evaluation_id DESC LIMIT 1",
            {"m": champion[0]["model_version"]},
        ) if champion else None
        confirmed = store.frame(
            con, "SELECT c.item_id, c.label, i.text, i.features FROM production_corpus c JOIN items i USING (item_id) "
            "WHERE c.reviewer_confirmed",
        ) if plan.reviewer_confirmed_slice else None
    if champion and train.current_version(home.models) != champion[0]["model_version"]:
        # A promotion cut off between the registry commit and the pointer move: finish it.
        train.set_current(home.models, champion[0]["model_version"])
        context.log.warning(f"models/CURRENT moved to the registered champion {champion[0]['model_version']}")
    if not challenger:
        holder = champion[0]["model_version"] if champion else "none"
        return dg.MaterializeResult(metadata={"decision": "nothing to evaluate", "champion": holder})
    challenger, champion = challenger[0], (champion[0] if champion else None)
    gold_labels = gold_items["label"].to_numpy()
    try:
        # Each model is loaded and predicts the gold items once: its scores and (on a promotion)
        # the confirm threshold come from the same probabilities.
        model = _load(home, challenger)
        probabilities = model.predict_proba(gold_items)
        scores = {"challenger": evaluation.score(probabilities, model.classes, gold_labels, plan.calibration_bins)}
        if champion is not None:
            held = _load(home, champion)
            scores["champion"] = evaluation.score(
                held.predict_proba(gold_items), held.classes, gold_labels, plan.calibration_bins
            )
        if confirmed is not None and isinstance(model, train.ExternalModel):
            # An external model answers only for what it was trained on: the confirmed items it
            # lacks (gold copies, items confirmed since) are not in its slice.
            confirmed = confirmed.filter(pl.Series(~np.isnan(model.stored(confirmed["item_id"])).any(axis=1)))
        slice_scores = evaluation.score(
            model.predict_proba(confirmed), model.classes, confirmed["label"].to_numpy(), plan.calibration_bins
        ) if confirmed is not None else None
    except (OSError, ValueError, KeyError) as error:
        raise dg.Failure(
            description=f"evaluation of {challenger['model_version']} failed ({error}); the champion is untouched"
        ) from None
    decision, reasons = evaluation.decide(scores["challenger"], scores.get("champion"), plan)
    confirm_below = evaluation.confirm_threshold(
        probabilities.max(axis=1), model.classes[probabilities.argmax(axis=1)] == gold_labels, plan.confirm_precision
    ) if decision == evaluation.PROMOTE else None
    version = challenger["model_version"]
    judged = registry.Evaluation(
        challenger=version, champion=champion and champion["model_version"], decision=decision,
        reasons=reasons, plan=plan.as_dict(), scores=scores, slice_scores=slice_scores,
        confirm_below=confirm_below, evaluation_set=evaluation_set, run_id=run_id(context),
        policies=EVALUATION_POLICIES,
    )
    with open_store(database) as con:
        try:
            recorded = registry.record_evaluation(con, judged)
        except registry.EvaluationSetChanged:
            raise dg.Failure(
                description=f"gold.jsonl declared a new evaluation set while {version} was being scored on "
                f"set {evaluation_set}; nothing recorded: run model_evaluation again to score both models "
                "on the new set"
            ) from None
    if not recorded:
        context.log.info(f"{version} was judged by another run meanwhile; nothing recorded")
        return dg.MaterializeResult(metadata={"decision": "judged by another run", "challenger": version})
    if decision == evaluation.PROMOTE:
        # The pointer moves after the registry commits: serving never loads an unregistered model.
        train.set_current(home.models, version)
    return dg.MaterializeResult(
        metadata={
            "decision": decision,
            "challenger": version,
            "champion": (
                version if decision == evaluation.PROMOTE else (champion["model_version"] if champion else "none")
            ),
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in reasons)),
            "scores": dg.MetadataValue.md(markdown_table(_score_table(scores))),
            "confirm_below": (
                dg.MetadataValue.float(round(confirm_below, 4)) if confirm_below is not None else "unchanged"
            ),
            "plan": dg.MetadataValue.json(plan.as_dict()),
            "evaluation_set": evaluation_set if evaluation_set is not None else "none declared",
            "n_eval": scores["challenger"]["n"],
            "champion_rescored": _rescored(champion, champion_set, evaluation_set),
        }
    )


def _rescored(champion: dict | None, last_set: int | None, evaluation_set: int | None) -> str:
    """Say on which set the champion's previous score was measured, next to today's."""
    if champion is None:
        return "no champion"
    before = "not recorded" if last_set is None else f"set {last_set}"
    note = "" if last_set == evaluation_set else " (another set: its stored score is not comparable)"
    return f"{champion['model_version']} rescored on set {evaluation_set}; last scored on {before}{note}"


def _load(home: Home, model_row: dict) -> train.TrainedModel | train.ExternalModel:
    return train.load(home.model_folder(model_row["path"]), model_row.get("file_sha256"))[0]


def _score_table(scores: dict) -> pl.DataFrame:
    rows = []
    for who, scored in scores.items():
        rows.append({"model": who, "accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"],
                     "calibration_error": scored["calibration_error"],
                     "lowest_class_recall": min(scored["per_class_recall"].values(), default=None)})
    return pl.DataFrame(rows).with_columns(pl.selectors.float().round(4))


@labelloop_asset(
    group="training",
    kinds={"scikit-learn", "markdown"},
    code_version="1",
    deps=[model_evaluation],
)
def release_notes(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Markdown notes for each promotion or rejection: corrections incorporated, metric deltas, which corrections paid off."""  # noqa: E501 -- kept on one line: the docs' asset reference shows a description's first line
    with config_errors_as_failures():
        plan = labelloop.validation_plan()
    home = labelloop.home()
    with open_store(database) as con:
        pending = store.frame(
            con,
            "SELECT e.* FROM model_evaluations e ANTI JOIN release_notes r USING (evaluation_id) "
            "ORDER BY e.evaluation_id",
        ).to_dicts()
        gold_items = store.frame(con, GOLD_SQL)
        written = []
        for judged in pending:
            # An external trainer's model has no pipeline labelloop could refit (spec None).
            models = {row["model_version"]: {**row, "spec": None if external.is_external(row["algorithm"])
                                             else PipelineSpec.from_recorded(row["params"])}
                      for row in store.frame(
                con, "SELECT model_version, corpus_version, algorithm, params FROM models "
                "WHERE list_contains($v, model_version)",
                {"v": [judged["challenger"], judged["champion"]]},
            ).iter_rows(named=True)}
            challenger, champion = models[judged["challenger"]], models.get(judged["champion"])
            until = challenger["corpus_version"]
            since = champion["corpus_version"] if champion else 0
            changes = release.label_changes(con, since, until)
            # Attribution refits the way the challenger was fitted, so its deltas are the challenger's.
            attributed = release.attribution(
                con, changes, since, until, gold_items, plan.attribution_max_groups if judged["champion"] else 0,
                challenger["spec"],
            )
            text = release.render(
                judged, changes, attributed, challenger["spec"], champion["spec"] if champion else None,
                external_challenger=json.loads(challenger["params"]) if challenger["spec"] is None else None,
                external_champion=bool(champion) and champion["spec"] is None,
            )
            path = write_atomically(home.reports / "release-notes" / f"{judged['challenger']}.md", text)
            store.append(con, "release_notes", pl.DataFrame([{
                "evaluation_id": judged["evaluation_id"], "challenger": judged["challenger"],
                "champion": judged["champion"], "decision": judged["decision"],
                "n_label_changes": changes.height, "attribution": json.dumps(attributed.to_dicts()),
                "markdown": text, "path": path.relative_to(home.root).as_posix(), "run_id": run_id(context),
            }]))
            written.append((judged, text, path))
    if not written:
        return dg.MaterializeResult(metadata={"notes_written": 0})
    judged, text, path = written[-1]
    return dg.MaterializeResult(
        metadata={
            "notes_written": len(written),
            "challenger": judged["challenger"],
            "decision": judged["decision"],
            "path": dg.MetadataValue.path(str(path)),
            "notes": dg.MetadataValue.md(text),
        }
    )
