"""Label Studio as the reviewers' front end: the labeling config for a home's ontology, review
tasks (the outbox) as Label Studio's import JSON with the champion's prediction pre-filled, and
Label Studio's JSON export back as correction lines.

Authority never comes from the export: an annotator is mapped to a contributor through the
`label_studio:` address contributors.yaml lists for them, and the correction's `user_role` is the
role the directory grants that contributor. An annotation that cannot become a correction (a
skip, no choice, a label outside the ontology, an annotator the directory does not list) is
refused with a reason and counted: annotations in = written + refused.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import quoteattr

from labelloop_assets.core.directory import Directory
from labelloop_assets.core.ontology import Ontology

# The control names in the labeling config; predictions and annotations name them too.
FROM_NAME = "label"
TO_NAME = "text"
# The landing subfolder imported answers go to: a producer of its own (contributors.yaml `via`).
PRODUCER = "label-studio"
EVENT_PREFIX = "ls"
# A correction's source: what the task asked for (the outbox's answer_source), else annotation.
ANNOTATION, AUDIT_SAMPLE = "annotation", "audit_sample"
ANSWER_SOURCES = ("review_prompt", AUDIT_SAMPLE)
# uris whose path ends so are shown as an image; any other http(s) uri as a link.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".svg")
LINK_SCHEMES = ("http://", "https://")
# Features are shown as text: at most this many values (a 64-pixel digit shows whole).
MAX_FEATURES_SHOWN = 256
# An export read whole into memory; larger ones are exported in parts (by task filter) instead.
MAX_EXPORT_BYTES = 256 * 1024 * 1024

# Why an annotation was not written as a correction (the import's report names these).
SKIPPED = "skipped"  # the annotator skipped or cancelled the task: no answer
UNKNOWN_ANNOTATOR = "unknown_annotator"  # no contributor lists this Label Studio address
ANNOTATOR_UNNAMED = "annotator_unnamed"  # the export gives only a user number, and no --users file names it
NO_CHOICE = "no_choice"
LABEL_NOT_IN_ONTOLOGY = "label_not_in_ontology"
NOT_A_LABELLOOP_TASK = "not_a_labelloop_task"  # the task's data has no item_id (not from our export)
BAD_ANNOTATION = "bad_annotation"  # no id, no time with a zone, or not an object
REFUSAL_REASONS = (
    SKIPPED,
    UNKNOWN_ANNOTATOR,
    ANNOTATOR_UNNAMED,
    NO_CHOICE,
    LABEL_NOT_IN_ONTOLOGY,
    NOT_A_LABELLOOP_TASK,
    BAD_ANNOTATION,
)


class LabelStudioError(Exception):
    """A whole input that cannot be used (not an export, no outbox file): the command's message."""


# --------------------------------------------------------------------------- the labeling config


def labeling_config(ontology: Ontology) -> str:
    """Label Studio's XML for the home's label set: one single choice (`label`) over the item.

    Every task carries `text` (the item's text; for an item without text its features or uri as
    text), `media` (an image or link for an http(s) uri, else empty) and `prompt` (the item id,
    its current label and why it was picked). One config serves every kind of item."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in ontology.labels)
    return (
        "<View>\n"
        '  <Header value="$prompt" size="5"/>\n'
        f'  <Text name="{TO_NAME}" value="$text"/>\n'
        '  <HyperText name="media" value="$media" inline="true"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInline="true" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


# --------------------------------------------------------------------------- tasks -> import JSON


@dataclass
class Export:
    """Label Studio import JSON from one outbox file, with what could not be exported."""

    tasks: list[dict]
    with_prediction: int = 0
    refused: list[dict] = field(default_factory=list)  # {line, reason, detail}


def read_outbox(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value or the JSON error) for each non-blank line."""
    lines = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                lines.append((number, json.loads(text)))
            except json.JSONDecodeError as error:
                lines.append((number, error))
    return lines


def import_tasks(lines: list[tuple[int, object]], ontology: Ontology) -> Export:
    """Outbox lines as Label Studio tasks: `data` for the config above plus the ids the answers
    carry back; the champion's prediction, when it names a current label, as a prediction."""
    export = Export(tasks=[])
    for number, line in lines:
        problem = _task_problem(line)
        if problem:
            export.refused.append({"line": number, "reason": "bad_task", "detail": problem})
            continue
        prediction = line.get("prediction") if isinstance(line.get("prediction"), dict) else None
        task = {"data": _task_data(line, prediction)}
        predicted = ontology.resolve_term(str(prediction.get("label"))) if prediction else None
        if prediction and predicted in ontology.labels:
            task["predictions"] = [
                {
                    "model_version": str(prediction.get("model_version") or "champion"),
                    "score": _probability(prediction.get("probability")),
                    "result": [
                        {
                            "from_name": FROM_NAME,
                            "to_name": TO_NAME,
                            "type": "choices",
                            "value": {"choices": [predicted]},
                        }
                    ],
                }
            ]
            export.with_prediction += 1
        export.tasks.append(task)
    return export


def _task_problem(line) -> str | None:
    if isinstance(line, json.JSONDecodeError):
        return f"not JSON: {line.msg}"
    if not isinstance(line, dict):
        return "not a JSON object"
    for name in ("task_id", "item_id"):
        value = line.get(name)
        if not isinstance(value, str) or not value.strip():
            return f"no {name}"
    return None


def _task_data(line: dict, prediction: dict | None) -> dict:
    uri = line.get("uri") if isinstance(line.get("uri"), str) else None
    current = line.get("current_label")
    why = line.get("why") if isinstance(line.get("why"), str) else ""
    # A blind audit shows no current label (the outbox leaves it out); the prompt does not say "none".
    blind = line.get("answer_source") == AUDIT_SAMPLE or line.get("role") == "reviewer"
    prompt = (
        line["item_id"] if blind else f"{line['item_id']} - current label: {current if current is not None else 'none'}"
    )
    return {
        "text": _shown_text(line.get("text"), line.get("features"), uri),
        "media": _media(uri),
        "prompt": f"{prompt}. {why}".strip() if why else prompt,
        "item_id": line["item_id"],
        "task_id": line["task_id"],
        "current_label": None if current is None else str(current),
        "model_version": str(prediction["model_version"]) if prediction and prediction.get("model_version") else None,
        "why": why,
        "answer_source": line.get("answer_source") if line.get("answer_source") in ANSWER_SOURCES else None,
        "uri": uri,
        "role": line.get("role"),
        "policy": line.get("policy"),
        "rank": line.get("rank"),
        "expires_at": line.get("expires_at"),
    }


def _shown_text(text, features, uri: str | None) -> str:
    """What the Text control shows: the item's text, else its features, else its uri."""
    if isinstance(text, str) and text.strip():
        return text
    if isinstance(features, list) and features:
        shown = ", ".join(_number(v) for v in features[:MAX_FEATURES_SHOWN])
        more = f", ... ({len(features):,} values)" if len(features) > MAX_FEATURES_SHOWN else ""
        return f"features: {shown}{more}"
    return f"uri: {uri}" if uri else "(the item carries no text, features or uri)"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _media(uri: str | None) -> str:
    """An image or a link for an http(s) uri (escaped: the uri is data, not markup), else nothing."""
    if not uri or not uri.lower().startswith(LINK_SCHEMES):
        return ""
    address = html.escape(uri, quote=True)
    if uri.lower().split("?", 1)[0].endswith(IMAGE_SUFFIXES):
        return f'<img src="{address}" alt="the item" style="max-width: 100%"/>'
    return f'<a href="{address}" target="_blank" rel="noopener noreferrer">{address}</a>'


def _probability(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    return None


# --------------------------------------------------------------------------- export -> corrections


@dataclass
class Import:
    """Correction lines from one Label Studio export, and the annotations refused (with why)."""

    project: int | None
    annotations: int = 0
    lines: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)  # {task, annotation, reason, detail}

    def reasons(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.refused).most_common())


def load_export(path: Path) -> list:
    """Label Studio's JSON export (a list of tasks), read whole."""
    try:
        # Read at most one byte past the limit: a named pipe or a device has no size to check first.
        with path.open("rb") as handle:
            content = handle.read(MAX_EXPORT_BYTES + 1)
        if len(content) > MAX_EXPORT_BYTES:
            raise LabelStudioError(
                f"{path} is more than {MAX_EXPORT_BYTES:,} bytes; export fewer tasks at a time"
            )
        raw = json.loads(content)
    except (OSError, ValueError) as error:  # a JSONDecodeError and a UnicodeDecodeError are ValueErrors
        raise LabelStudioError(f"cannot read {path} as a Label Studio JSON export: {error}") from None
    # Checked whole before anything is written: a task that is not an object, or annotations that
    # are not a list, would otherwise be lost without a count.
    if not isinstance(raw, list):
        raise LabelStudioError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    for number, task in enumerate(raw, 1):
        if not isinstance(task, dict) or not isinstance(task.get("annotations") or [], list):
            raise LabelStudioError(
                f"{path} is not a Label Studio JSON export: task {number} is not an object with a list of annotations"
            )
    return raw


def load_users(path: Path) -> dict[int, str]:
    """Label Studio user numbers -> e-mail, from the users list its API gives (GET /api/users/)."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise LabelStudioError(f"cannot read {path} as a Label Studio users list: {error}") from None
    raw = raw.get("results", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, list):
        raise LabelStudioError(f"{path} is not a Label Studio users list (a list of {{id, email}})")
    return {
        u["id"]: u["email"]
        for u in raw
        if isinstance(u, dict) and isinstance(u.get("id"), int) and isinstance(u.get("email"), str)
    }


def corrections(
    export: list,
    directory: Directory,
    ontology: Ontology,
    project: int | None = None,
    users: dict[int, str] | None = None,
) -> Import:
    """One correction line per answered annotation of the export; every other annotation refused.

    `event_id` is `ls-<project>-<annotation>-<revision>`: importing the same export again gives
    the same ids (ingest keeps the first), and an annotation edited in Label Studio comes back as
    a new event, the contributor's latest vote."""
    result = Import(project=_project_of(export, project))
    by_address = directory.label_studio_addresses()
    for task in export:  # load_export checked the shape: tasks are objects, annotations lists
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        # Drafts (`drafts`) are not answers: only submitted annotations become corrections.
        for annotation in task.get("annotations") or []:
            result.annotations += 1
            line, reason, detail = _correction(
                task, data, annotation, result.project, by_address, ontology, users or {}
            )
            if line is not None:
                result.lines.append(line)
            else:
                result.refused.append(
                    {
                        "task": task.get("id"),
                        "annotation": annotation.get("id") if isinstance(annotation, dict) else None,
                        "reason": reason,
                        "detail": detail,
                    }
                )
    return result


def _project_of(export: list, given: int | None) -> int:
    named = (
        a.get("project") if isinstance(a, dict) and "project" in a else t.get("project")
        for t in export
        if isinstance(t, dict)
        for a in (t.get("annotations") or [None])
    )
    found = {p for p in named if isinstance(p, int) and not isinstance(p, bool)}
    if given is not None:
        if found - {given}:
            raise LabelStudioError(f"the export is of project {', '.join(map(str, sorted(found)))}, not {given}")
        return given
    if len(found) > 1:
        raise LabelStudioError(f"the export holds projects {sorted(found)}; import one project at a time")
    if not found:
        raise LabelStudioError(
            "the export does not say its project; give --project N (the number in the project's address)"
        )
    return found.pop()


def _correction(
    task: dict, data: dict, annotation, project: int, by_address: dict, ontology: Ontology, users: dict[int, str]
) -> tuple[dict | None, str, str]:
    if not isinstance(annotation, dict) or not isinstance(annotation.get("id"), int):
        return None, BAD_ANNOTATION, "an annotation without a numeric id"
    item_id, task_id = data.get("item_id"), data.get("task_id")
    if not isinstance(item_id, str) or not item_id.strip():
        return None, NOT_A_LABELLOOP_TASK, "the task's data has no item_id (not exported by `labelloop label-studio`)"
    if annotation.get("was_cancelled"):
        return None, SKIPPED, "the annotator skipped the task"
    address = _annotator(annotation.get("completed_by"), users)
    if address is None:
        return (
            None,
            ANNOTATOR_UNNAMED,
            (
                f"the export names annotator {annotation.get('completed_by')!r} by number only; export with annotator "
                "details (serialization option annotations__completed_by only_id=false) or give --users"
            ),
        )
    person = by_address.get(address.strip().casefold())
    if person is None:
        return None, UNKNOWN_ANNOTATOR, f"{address} is not the label_studio address of anyone in contributors.yaml"
    chosen = _choices(annotation.get("result"))
    if len(chosen) != 1:
        return None, NO_CHOICE, "no label chosen" if not chosen else f"{len(chosen)} labels chosen, not one"
    label = chosen[0]
    if ontology.resolve_term(label) not in ontology.labels:
        return None, LABEL_NOT_IN_ONTOLOGY, f"{label!r} is not a label of the ontology"
    created, revision = _time(annotation.get("created_at")), _time(annotation.get("updated_at"))
    if created is None:
        return None, BAD_ANNOTATION, f"created_at {annotation.get('created_at')!r} is not a time with a zone"
    # The answer as it stands was given when it was last changed.
    answered = max(created, revision) if revision else created
    line = {
        "event_id": f"{EVENT_PREFIX}-{project}-{annotation['id']}-{_digest(answered.isoformat())}",
        "item_id": item_id,
        "corrected_label": label,
        "user_id": person.id,
        "user_role": person.role,  # the grant, never anything the export says
        # What the task asked for (review_prompt, or audit_sample for a blind audit), else annotation.
        "source": data["answer_source"] if data.get("answer_source") in ANSWER_SOURCES else ANNOTATION,
        "consent": True,
        "created_at": answered.isoformat().replace("+00:00", "Z"),
        "context": {"label_studio": {"project": project, "task": task.get("id"), "annotation": annotation["id"]}},
    }
    if isinstance(task_id, str) and task_id.strip():
        line["task_id"] = task_id
    if isinstance(data.get("current_label"), str):
        line["original_label"] = data["current_label"]
    if isinstance(data.get("model_version"), str):
        line["model_version"] = data["model_version"]
    return line, "", ""


def _annotator(completed_by, users: dict[int, str]) -> str | None:
    if isinstance(completed_by, dict) and isinstance(completed_by.get("email"), str):
        return completed_by["email"]
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("id")
    if isinstance(completed_by, int) and not isinstance(completed_by, bool):
        return users.get(completed_by)
    return None


def _choices(result) -> list[str]:
    """The labels chosen in the `label` control of an annotation's result."""
    chosen: list[str] = []
    for region in result if isinstance(result, list) else []:
        if isinstance(region, dict) and region.get("from_name") == FROM_NAME and region.get("type") == "choices":
            value = region.get("value") if isinstance(region.get("value"), dict) else {}
            choices = value.get("choices") if isinstance(value.get("choices"), list) else []
            chosen += [str(c) for c in choices if isinstance(c, (str, int)) and not isinstance(c, bool)]
    return chosen


def _time(value) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else None
    except (ValueError, OverflowError):  # year 1 at +14:00 is before year 1 in UTC
        return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def landing_text(lines: list[dict]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in lines)


def landing_name(project: int, text: str) -> str:
    """The landed file's name: the same export lands under the same name (written once)."""
    return f"label-studio-p{project}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}.jsonl"
