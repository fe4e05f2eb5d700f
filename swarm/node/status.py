"""What ``node.py status`` says of a swarm: a line per member (device, precision, memory used / cap,
links, state, plan, role), the stages' holders and snapshots, reachability, validation loss, spares,
trust notes and the committed plan; ``status --json``'s member objects."""
from __future__ import annotations


def status_lines(view, records) -> list[str]:
    """The table ``status`` prints for ``view`` (its ``records`` in peer order), without the count."""
    out: list[str] = []
    out.append(f"{'peer':<14}{'device':<18}{'prec':>5}{'TFLOP/s':>9}{'mem GB used/cap':>16}{'bw to others':>22}{'state':>9}"
               f"{'uptime':>9}{'epoch':>7}{'plan':>18}  role")
    for r in records:
        bw = [f"{b / 1e6:.0f}" for b in r.bandwidth_bps.values()]
        bw_text = f"{min(bw, key=float)}-{max(bw, key=float)} Mbit/s" if bw else "not measured"
        used = "-" if r.memory_peak_bytes is None else f"{r.memory_peak_bytes / 1e9:.2f}"
        cap = f"{(r.memory_limit_bytes or r.memory_bytes) / 1e9:.2f}"   # the limit, else what it advertises
        out.append(f"{r.peer_id[-12:]:<14}{(r.device + ' ' + r.device_name)[:17]:<18}{r.precision or '-':>5}{r.tflops:>9.3f}"
              f"{used + '/' + cap:>16}"
              f"{bw_text:>22}{r.state:>9}{r.uptime_s:>8.0f}s{r.committed_epoch if r.committed_epoch is not None else '-':>7}"
              f"{r.committed_hash or '-':>18}  {r.role or '-'}")
    for row in stage_table(records):
        backups = ", ".join(f"{b[-8:]} ({age} steps old)" for b, age in row["backups"]) or "none"
        out.append(f"stage {row['stage']}: held by {', '.join(h[-8:] for h in row['holders'])} at step {row['step']}; "
              f"snapshots: {backups}")
    for r in records:
        if r.reachability is not None or r.paths or r.unreachable:
            paths = ", ".join(f"{p[-8:]} {path}" for p, path in sorted((r.paths or {}).items())) or "no member connected"
            cut = f"; cannot reach {', '.join(p[-8:] for p in r.unreachable)}" if r.unreachable else ""
            out.append(f"reach: {r.peer_id[-8:]} is {REACH_TEXT.get(r.reachability, 'not checked yet')}; links: {paths}{cut}")
    measured = [r for r in records if r.val_loss is not None]
    if measured:
        out.append("validation loss: " + ", ".join(f"{r.val_loss:.4f} ({r.peer_id[-8:]}, step {r.step})" for r in measured))
    spares = [r.peer_id[-8:] for r in records if r.role == "spare"]
    if spares:
        out.append(f"spares: {', '.join(spares)}")
    out.extend(trust_notes(view))
    plans = {(r.committed_epoch, r.committed_hash) for r in records if r.committed_hash}
    if plans:
        epoch, plan = max(plans, key=lambda p: p[0])
        agree = sum((r.committed_epoch, r.committed_hash) == (epoch, plan) for r in records)
        out.append(f"committed: epoch {epoch}, plan {plan} ({agree} of {len(records)} members run it)")
    return out


REACH_TEXT = {"public": "public", "nat": "behind NAT (hole punching)", "relayed": "relayed (behind NAT, no direct dial)"}


def member_json(records) -> list[dict]:
    """``status --json``: every member's record as published (peer_id, maddrs, state, role, stage, step, plan,
    ...; not its binary credential, which members have already checked), its uptime, and its measured ``links``:
    peer id -> ``{"bandwidth_bps", "rtt_s", "path"}`` (any may be missing; ``path``: ``direct`` or ``relayed``,
    how its connection to that peer runs). ``reachability``: ``public``, ``nat`` or ``relayed`` (None: unchecked)."""
    out = []
    for r in records:
        wire = {k: v for k, v in r.to_wire().items() if k != "credential"}
        links = {p: {"bandwidth_bps": b} for p, b in wire["bandwidth_bps"].items()}
        for p, rtt in wire["rtt_s"].items():
            links.setdefault(p, {})["rtt_s"] = rtt
        for p, path in (wire["paths"] or {}).items():
            links.setdefault(p, {})["path"] = path
        out.append({**wire, "uptime_s": r.uptime_s, "links": links})
    return out


def trust_notes(view) -> list[str]:
    """What ``status`` says of members planning does not take at their word: compute claims it
    down-rates (``swarm.planning.ratings``) and bans for NaN/Inf that members report (disputes)."""
    from swarm.planning import ratings

    lines = [f"down-rated: {peer[-8:]} claims {claimed:.3g} TFLOP/s, planned at {rated:.3g} ({why})"
             for peer, (claimed, rated, why) in ratings(view, view.peers()).items() if why]
    for peer in view.peers():   # the plan's neighbours decide what a dispute costs (swarm.planning.disputed)
        if view.members[peer].distrusts:
            lines.append(f"dispute: {peer[-8:]} banned {', '.join(p[-8:] for p in view.members[peer].distrusts)} "
                         "for sending NaN/Inf")
    return lines


def stage_table(records) -> list[dict]:
    """Per stage: its holders, their step, and the other members holding a snapshot of its ops (age in steps)."""
    rows = []
    for stage in sorted({r.stage for r in records if r.stage is not None}):
        holders = [r for r in records if r.stage == stage]
        step = max(r.step or 0 for r in holders)
        live = [(a, b) for r in holders for a, b, s in (r.holds or []) if s == (r.step or 0)]
        backups = []
        for r in records:
            if r.stage == stage:
                continue
            # a snapshot newer than the holders' step: their record is a heartbeat older than the backup's
            ages = [max(0, step - s) for a, b, s in (r.holds or []) for lo, hi in live if a < hi and lo < b]
            if ages:
                backups.append((r.peer_id, min(ages)))
        rows.append({"stage": stage, "holders": [r.peer_id for r in holders], "step": step, "backups": backups})
    return rows


