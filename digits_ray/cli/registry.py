"""``digits-ray registry``: what the registry holds, and which entry is served.

    digits-ray registry list                     # entries with validation and test accuracy, and which is served
    digits-ray registry promote ENTRY            # serve ENTRY (pinned: later searches do not replace it)
    digits-ray registry rollback | unpin | history
"""

from __future__ import annotations

import argparse
from typing import Any

from digits_ray.cli.serve import add_registry_option
from digits_ray.errors import ConfigError


def add_commands(sub: Any) -> None:
    reg = sub.add_parser("registry", help="list entries; promote one to be served, roll back, unpin",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    reg.add_argument("action", choices=("list", "history", "promote", "rollback", "unpin"))
    reg.add_argument("entry", nargs="?", default=None, help="promote: the entry to serve")
    add_registry_option(reg)
    reg.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from digits_ray.models import registry

    if args.action == "list":
        rows = registry.entries_table(args.registry)
        if not rows:
            print(f"{registry.registry_path(args.registry).resolve()} has no entries yet")
            return 0
        def pct(value: Any) -> str:
            return f"{value:.2%}" if isinstance(value, float) else "-"

        print(f"{'entry':<44} {'model':<9} {'val':>7} {'test':>7}  {'published':<25} status")
        for row in rows:
            print(f"{row['entry']:<44} {row['model'] or '-':<9} {pct(row['val_accuracy']):>7} "
                  f"{pct(row['test_accuracy']):>7}  {row['published'] or '-':<25} {row['status']}")
        return 0
    if args.action == "history":
        for event in registry.read_index(args.registry)["history"]:
            print(f"{event['at']}  {event['event']:<8} {event['entry']:<44} served: {event['served']} "
                  f"(before: {event['previous']}) by {event['by']}")
        return 0
    if args.action == "promote":
        if not args.entry:
            raise ConfigError("promote needs the ENTRY to serve (see: registry list)")
        event = registry.promote(args.registry, args.entry)
    elif args.entry:
        raise ConfigError(f"{args.action} takes no ENTRY")
    else:
        event = (registry.rollback if args.action == "rollback" else registry.unpin)(args.registry)
    print(f"{registry.registry_path(args.registry).resolve()}: serves {event['served']} (was {event['previous']}); "
          f"Serve replicas that follow this registry swap to it within their poll interval")
    return 0
