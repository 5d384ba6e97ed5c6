"""Default progress plugin: on a terminal, a tqdm bar over the heal (samples done, samples/s,
the last epoch's loss) with one line per epoch; elsewhere (logs, CI) the per-epoch lines only.

Silence it with ``HealConfig(quiet=True)``, ``STARFISH_PLUGINS`` without ``progress``, or
``starfish.plugin_manager().unregister(name="progress")``.
"""

from __future__ import annotations

import sys

from starfish_plugin.plugins.hookspecs import hookimpl

_bar = None


def _close() -> None:
    global _bar
    if _bar is not None:
        _bar.close()
        _bar = None


@hookimpl
def starfish_heal_started(model, plan, config, total_steps) -> None:
    global _bar
    _close()
    if config.quiet:
        return
    print(f"[starfish] healing: {plan.describe()}, loss={config.loss}, {config.epochs} epochs", file=sys.stderr)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        # counted in steps, shown in samples (unit_scale): the rate reads as samples/s
        _bar = tqdm(total=total_steps, desc="healing", unit="sample", unit_scale=config.batch_size, leave=False,
                    file=sys.stderr)


@hookimpl
def starfish_step_ended(step, total_steps, config) -> None:
    if _bar is not None:
        _bar.update(1)


@hookimpl
def starfish_epoch_ended(epoch, epochs, loss, lr, seconds, config, held_out) -> None:
    if config.quiet:
        return
    judged = f"  held-out {held_out:.5f}" if held_out is not None else ""
    line = f"[starfish] epoch {epoch}/{epochs}  loss {loss:.5f}{judged}  lr {lr:.2e}  {seconds:.1f}s"
    if _bar is not None:
        _bar.set_postfix_str(f"epoch {epoch}/{epochs} loss {loss:.4f}", refresh=False)
        _bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


@hookimpl
def starfish_heal_failed(model, error, config) -> None:
    _close()
    if not config.quiet:
        print(f"[starfish] healing failed: {error}", file=sys.stderr)


@hookimpl
def starfish_heal_finished(model, report, config) -> None:
    _close()
    if not config.quiet:
        print(
            f"[starfish] done in {report.seconds:.1f}s: mean block cosine "
            f"{report.mean_cosine_before:.4f} -> {report.mean_cosine_after:.4f}, "
            f"mask unchanged: {report.mask_unchanged}",
            file=sys.stderr,
        )
