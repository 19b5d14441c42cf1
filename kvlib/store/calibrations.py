"""The guard's calibrations in the manifest: one per (model fingerprint, encoding).

Design facts:
- The store keeps a calibration as JSON it does not interpret (engine/calibration.py owns
  its meaning); the method and confidence are columns too, so a table can list them.
- A model must be registered (models row) before its calibration is stored: the
  calibration belongs to the model, and names it by fingerprint.
- `put` replaces the earlier calibration of the same model and encoding in one statement
  (INSERT ... ON CONFLICT DO UPDATE), on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from kvlib.errors import InputError
from kvlib.store.schema import calibrations, models


def put_calibration(db, conn, model_fp: str, encoding: str, payload: dict, *, method: str, confidence: float,
                    created: str) -> None:
    if conn.execute(sa.select(models.c.fingerprint).where(models.c.fingerprint == model_fp)).first() is None:
        raise InputError(f"model {model_fp[:12]} is not registered in this library: register it before calibrating")
    row = {"model_fp": model_fp, "encoding": encoding, "method": method, "confidence": float(confidence),
           "payload": json.dumps(payload, allow_nan=False), "created": created}
    statement = db.insert(calibrations).values(**row)
    conn.execute(statement.on_conflict_do_update(
        index_elements=["model_fp", "encoding"],
        set_={k: statement.excluded[k] for k in ("method", "confidence", "payload", "created")}))


def get_calibration(conn, model_fp: str, encoding: str) -> dict | None:
    """The stored payload, or None."""
    query = sa.select(calibrations.c.payload).where(calibrations.c.model_fp == model_fp,
                                                    calibrations.c.encoding == encoding)
    text = conn.execute(query).scalar()
    return None if text is None else json.loads(text)


def list_calibrations(conn) -> list[dict]:
    """Every stored calibration's model, encoding, method, confidence and date (no payload)."""
    query = sa.select(calibrations.c.model_fp, models.c.name, calibrations.c.encoding, calibrations.c.method,
                      calibrations.c.confidence, calibrations.c.created).join(
        models, models.c.fingerprint == calibrations.c.model_fp).order_by(calibrations.c.created)
    return [dict(r) for r in conn.execute(query).mappings()]
