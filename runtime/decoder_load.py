"""Loading a generation package's segments first..last as a ``DecoderSpan``: merged into one
session where they fit in one protobuf, and with alone sessions where they pay.

Alone sessions: on ``appliance serve --nodes 3`` each node gets 1 onnxruntime thread of 2 cores
so that nodes computing at once do not oversubscribe them. But a chain serving one cohort (a
single stream, or streams whose steps move together) computes one span at a time, and then 1
thread leaves a core idle: 2 threads ran one stream on 3 spans at 1.21x, and all streams from 4
at 0.93-1.10x (docs/performance.md). A second set of sessions with more threads runs only the
steps that hold every open sequence of the span (runtime/step_batcher.py decides).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from runtime.decoder import DecoderSpan
from runtime.decoder_merge import can_merge, merge_segment_files
from runtime.errors import ModelLoadError
from runtime.package import PackageRef, verify_segment
from runtime.session import ModelSession, SessionSettings, create_session, intra_op_threads_for

log = logging.getLogger(__name__)


def load_decoder_span(
    package: PackageRef,
    settings: SessionSettings,
    first: int,
    last: int,
    merge: bool = True,
    verify: bool = True,
) -> DecoderSpan:
    """Load segments first..last (inclusive) of a generation package as one span.

    With ``merge`` (the default) the segments become one session when their files fit in one
    protobuf (<= 1.8 GB): one run per step instead of one per segment.
    """
    manifest = package.manifest
    if manifest is None or not manifest.is_generation or manifest.generation is None:
        kind = "a plain model.onnx" if manifest is None else f"kind {manifest.kind!r}"
        raise ModelLoadError(
            f"{package.name} v{package.version} is {kind}; a decoder span needs a generation "
            "package (manifest format 2, kind 'generation')"
        )
    if not 0 <= first <= last < len(package.segments):
        raise ModelLoadError(
            f"span {first}..{last} is outside {package.name} v{package.version}'s "
            f"{len(package.segments)} segment(s)"
        )
    segments = package.segments[first : last + 1]
    if verify:
        for index in range(first, last + 1):
            verify_segment(package, index)
    paths = [package.folder / s.file for s in segments]
    mergeable = can_merge(
        package.folder, [s.file for s in segments], [s.external_data for s in segments]
    )
    merged = merge_segment_files(paths) if merge and len(segments) > 1 and mergeable else None

    def open_sessions(settings: SessionSettings) -> list[ModelSession]:
        if merged is None:
            return [create_session(p, settings) for p in paths]
        session = create_session(merged, settings)
        session.source = f"{package.folder.name}: segments {first}..{last} merged"
        return [session]

    sessions = open_sessions(settings)
    span = DecoderSpan(sessions, segments, manifest.generation)
    if settings.decode_io_binding != "auto":
        span.io_binding = settings.decode_io_binding == "on"
    if wants_alone_sessions(span, settings):
        span.use_alone_sessions(
            open_sessions(replace(settings, intra_op_threads=settings.alone_intra_op_threads))
        )
    log.info(
        "loaded %s v%s decoder segments %d..%d as %d session(s), IO binding %s, alone sessions %s",
        package.name,
        package.version,
        first,
        last,
        len(sessions),
        "on" if span.io_binding else "off",
        f"on {settings.alone_intra_op_threads} threads" if span.has_alone_sessions else "none",
    )
    return span


def wants_alone_sessions(span: DecoderSpan, settings: SessionSettings) -> bool:
    """Alone sessions are worth their second copy of the weights only on a CPU span holding
    part of a model (one that holds it whole has no chain to wait on) and with more threads
    than its sessions already have."""
    if span.device != "cpu" or (span.is_first and span.is_last):
        return False
    return settings.alone_intra_op_threads > intra_op_threads_for(settings, cuda=False)
