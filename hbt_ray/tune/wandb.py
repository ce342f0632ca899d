"""W&B for a sweep: one run per trial, grouped by sweep name, and a ``<sweep>-summary`` run.

Our guarantees: without ``WANDB_API_KEY`` everything is logged offline (``wandb sync`` later); an online
run that cannot reach W&B is logged offline instead; no W&B failure ever fails the sweep; the key is
never written to a file, a log line or a config.

**Per-trial runs: Ray's** :class:`ray.air.integrations.wandb.WandbLoggerCallback`. It starts one
logging actor per trial, turns every Tune result into ``wandb.log`` (numbers only; ``trial_id``,
``hostname``, … into the run config) and waits for the uploads at the end of the sweep. Where it falls
short of a guarantee, :class:`TrialRunsCallback` changes exactly that:

- offline without a key: Ray's ``setup()`` raises "No WandB API key found" unless the *environment*
  says ``WANDB_MODE=offline`` (our ``mode`` is a config key), so ``setup()`` skips Ray's key lookup;
  W&B itself reads the key from the environment of the logging actor.
- no key in any file: Ray hands ``WANDB_API_KEY`` to the logging actors in their ``runtime_env``, and
  Ray's runtime-env agent writes every runtime env it creates, env vars included, to
  ``runtime_env_agent.log`` in the session's log folder. ``setup()`` therefore declares the actor class
  without a ``runtime_env``: the actors run on the driver's node and inherit the key from the Ray
  workers' environment (a local Ray started by the sweep, or the job's env on a cluster). A key set
  only after Ray was started does not reach them: those trials log offline.
- never failing the sweep: Ray calls ``wandb.init`` once in the actor, lets any error but an HTTP one
  end the actor, and calls into its queues from Tune's driver loop unguarded. Our actor retries a
  failed online ``wandb.init`` offline, logs any other failure as a warning, and the callback turns
  every exception of its hooks into a warning.

Also ours: the base training config (scrubbed of secret-looking keys) merged into each trial's run
config, and the trial's end status (``trial_status``: ``TERMINATED`` / ``ERROR``) in it. These changes
rest on parts of Ray's module that are not public API (the ``_logger_actor_cls`` hook, the actor class
``_WandbLoggingActor``, ``_QueueItem``, the ``_remote_logger_class`` and ``_trial_queues`` attributes);
``tests/test_tune.py`` runs every one of them, so a Ray upgrade that moves them fails there.

**The summary run and the online → offline decision: ours** (:class:`SweepRun`). Ray's callback logs
trials only; the summary run carries the results table, the plots and ``summary.json``. It is opened
before the first trial, in this process, and if W&B cannot be reached online it falls back to offline,
and the trials are then started offline too (rather than each waiting ``init_timeout`` for the
server first).

>>> scrub_secrets({"wandb": {"api_key": "abc", "project": "p"}, "run": {"seed": 1}})
{'wandb': {'api_key': '<redacted>', 'project': 'p'}, 'run': {'seed': 1}}
>>> initial_mode(WandbConfig(mode="auto"), env={}, netrc_file="/nonexistent")
'offline'
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

from hbt_ray.config import flat
from hbt_ray.tune.config import WandbConfig

log = logging.getLogger("hbt_ray.tune")

#: A secret's key is one of these words as a whole part of its name (``wandb_api_key``, ``hf_token``), not any
#: name that contains one (``run.balance_tokens`` is a setting, and the config it is in must load again).
SECRET_RE = re.compile(r"(?:^|[_\-.])(api[_-]?key|apikey|secret|password|token)(?:$|[_\-.])", re.I)
REDACTED = "<redacted>"
#: Run-config key of a trial's end status.
STATUS_KEY = "trial_status"


def scrub_secrets(data: Any) -> Any:
    """A copy with the values of secret-looking keys replaced, for logs and W&B configs.

    >>> scrub_secrets({"wandb_api_key": "k", "HF_TOKEN": "t", "run": {"balance_tokens": True, "secret": 1}})
    {'wandb_api_key': '<redacted>', 'HF_TOKEN': '<redacted>', 'run': {'balance_tokens': True, 'secret': '<redacted>'}}
    """
    if isinstance(data, dict):
        return {k: (REDACTED if SECRET_RE.search(str(k)) else scrub_secrets(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub_secrets(v) for v in data]
    return data


def initial_mode(
    cfg: WandbConfig, env: Mapping[str, str] | None = None, netrc_file: str | os.PathLike | None = None
) -> str:
    """The mode to try first: ``auto`` is online with a key in the environment or a ``wandb login`` in
    the netrc file (``$NETRC``, else ``~/.netrc``: how a cluster's head gets the key, see README), else
    offline."""
    env = os.environ if env is None else env
    if cfg.mode != "auto":
        return cfg.mode
    if env.get("WANDB_API_KEY"):
        return "online"
    path = Path(netrc_file if netrc_file is not None else env.get("NETRC") or Path.home() / ".netrc")
    try:
        logged_in = netrc.netrc(path).authenticators(_wandb_host(env)) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def _wandb_host(env: Mapping[str, str]) -> str:
    """The host ``wandb login`` stores the key under (``$WANDB_BASE_URL``'s, by default W&B's API)."""
    base = env.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    return base.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


def _settings(cfg: WandbConfig) -> dict[str, Any]:
    return {"init_timeout": cfg.init_timeout, "silent": True, "console": "off"}


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _cell(value: Any) -> Any:
    return value if _scalar(value) else json.dumps(value, default=str)


# ------------------------------------------------------------------------------------ trial runs


class TrialLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor, with the base config merged in and a failed online init retried
    offline; no W&B error leaves the actor (it only ends that trial's logging)."""

    def __init__(self, *args: Any, base_config: dict[str, Any] | None = None, **kwargs: Any):
        from hbt_ray.tune.records import trial_params  # a resumed sweep nests them

        kwargs["config"] = scrub_secrets({**(base_config or {}), **trial_params(kwargs.get("config", {}))})
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        try:
            self._run()
        finally:
            # Close W&B's service connection while the actor is alive: left to W&B's exit hook, it ran
            # when Ray ended the actor, found the service gone and printed a traceback into the log.
            try:
                self._wandb.teardown()
            except Exception:  # noqa: BLE001, S110 — nothing left to save
                pass

    def _run(self) -> None:
        try:
            super().run()
            return
        except Exception as err:  # noqa: BLE001 — W&B must never fail the sweep
            failure = err
        if self._wandb.run is None and self.kwargs.get("mode") == "online":
            log.warning("W&B online init failed for %s (%s): logging it offline", self._trial_name,
                        type(failure).__name__)
            self.kwargs["mode"] = "offline"
            try:
                super().run()
                return
            except Exception as err:  # noqa: BLE001
                failure = err
        log.warning("W&B logging failed for %s: %s: %s", self._trial_name, type(failure).__name__, failure)
        try:
            self._wandb.finish(exit_code=1)
        except Exception:  # noqa: BLE001, S110 — nothing left to save
            pass


class TrialRunsCallback(WandbLoggerCallback):
    """Ray's ``WandbLoggerCallback`` with the changes the module docstring lists."""

    _logger_actor_cls = TrialLoggingActor
    AUTO_CONFIG_KEYS = [*WandbLoggerCallback.AUTO_CONFIG_KEYS, STATUS_KEY]

    def setup(self, *args: Any, **kwargs: Any) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Not Ray's setup(): no key lookup (W&B reads the key itself, or runs offline without one), and
        # an actor class without runtime_env, so the key is not written to Ray's runtime-env log. No
        # restarts: a restarted actor would start a second run; a dead one only ends that trial's logging.
        node = ray.get_runtime_context().get_node_id()
        self._remote_logger_class = ray.remote(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        )(self._logger_actor_cls)

    def log_trial_start(self, trial: Any) -> None:
        try:
            super().log_trial_start(trial)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B start failed for %s: %s", trial, type(err).__name__)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        try:
            super().log_trial_result(iteration, trial, result)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B log failed for %s: %s", trial, type(err).__name__)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        try:
            if trial in self._trial_queues:
                status = {STATUS_KEY: "ERROR" if failed else "TERMINATED"}
                self._trial_queues[trial].put((_QueueItem.RESULT, status))
            super().log_trial_end(trial, failed)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B finish failed for %s: %s", trial, type(err).__name__)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        try:
            super().on_experiment_end(trials, **info)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B upload wait failed: %s", type(err).__name__)

    def __del__(self) -> None:
        try:  # Ray's __del__ stops leftover actors; at interpreter exit Ray itself may be gone
            super().__del__()
        except Exception:  # noqa: BLE001, S110
            pass


def trial_runs_callback(
    cfg: WandbConfig, mode: str, group: str, out_dir: Path, base_config: dict[str, Any]
) -> TrialRunsCallback | None:
    """The Tune callback that logs every trial as one W&B run in ``group`` (None when disabled)."""
    if mode == "disabled":
        return None
    return TrialRunsCallback(
        project=cfg.project,
        group=group,
        entity=cfg.entity,
        mode=mode,
        dir=str(out_dir),
        job_type="trial",
        reinit="finish_previous",  # what Ray's reinit=True means, without W&B's deprecation warning
        # Offline there is nothing to upload: at the end wait only for the runs to close. (A trial the
        # experiment left running never closes its run: the default wait was half an hour.)
        **({} if mode == "online" else {"upload_timeout": 30}),
        settings=_settings(cfg),
        base_config=flat(base_config),
    )


# ----------------------------------------------------------------------------------- summary run


class SweepRun:
    """The ``<sweep>-summary`` run (ours: Ray's callback has no run for the sweep itself).

    :meth:`start` opens it with the online → offline fallback and returns the mode the trials should
    use; :meth:`finish` logs the results table, the plots and the summary. Failures are warnings.
    """

    def __init__(self, cfg: WandbConfig, group: str, out_dir: Path):
        self.cfg = cfg
        self.group = group
        self.dir = out_dir
        self.mode = initial_mode(cfg)
        self.run: Any = None

    def _init(self, mode: str) -> Any:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            mode=mode,
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.group,
            name=f"{self.group}-summary",
            job_type="sweep-summary",
            config={"sweep": self.group},
            dir=str(self.dir),
            reinit="create_new",
            settings=_settings(self.cfg),
        )

    def start(self) -> str:
        """Open the run; → the mode the trial runs should use (``offline`` after a failed online init)."""
        if self.mode == "disabled":
            return self.mode
        try:
            self.run = self._init(self.mode)
        except Exception as err:  # noqa: BLE001 — W&B must never fail the sweep
            if self.mode == "online":
                log.warning("W&B online init failed (%s); logging offline from now on", type(err).__name__)
                self.mode = "offline"
                try:
                    self.run = self._init(self.mode)
                except Exception as err2:  # noqa: BLE001
                    err = err2
            if self.run is None:
                log.warning("W&B init failed for the sweep summary: %s", type(err).__name__)
        return self.mode

    def finish(self, rows: list[dict[str, Any]], images: list[Path], summary: dict[str, Any]) -> None:
        """Log the results table, the plots and the summary's scalars, and close the run."""
        if self.run is None:
            return
        import wandb

        run, self.run = self.run, None
        try:
            keys: list[str] = []
            for row in rows:
                keys.extend(k for k in row if k not in keys)
            table = wandb.Table(columns=keys, data=[[_cell(row.get(k)) for k in keys] for row in rows])
            run.log({"results": table, **{p.stem: wandb.Image(str(p)) for p in images}})
            run.summary.update({k: v for k, v in summary.items() if _scalar(v)})
            run.finish()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B summary failed: %s", type(err).__name__)

    def abort(self) -> None:
        """Close the run as failed (the sweep raised before :meth:`finish`)."""
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception as err:  # noqa: BLE001
                log.warning("W&B summary failed: %s", type(err).__name__)
