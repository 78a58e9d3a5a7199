#!/usr/bin/env bash
# The runbook's interactive migration of messages to parts, over the backfill CLI.
#
#   ./scripts/production-migration.sh                 # development database
#   ./scripts/production-migration.sh --prod          # production: checklist, typed name, backup
#   ./scripts/production-migration.sh --prod --yes    # answer every question yes (printed)
#   ./scripts/production-migration.sh --prod --detach # run in the background, then `backfill wait`
#
# Steps: the target (its URL with the password hidden), `backfill status` and `count`; in prod the
# pre-production checklist and the environment's name typed; a backup offered (`backfill backup`);
# a dry run; the run of body_to_parts with an undo log (`run --undo`), its progress live (or
# detached, followed by `backfill wait`); then `backfill verify` and `status`.
#
# Script options: --yes answers every question yes and prints each answer; --detach runs the
# migration in the background and follows it. Every other option is passed to every backfill
# command (e.g. --database-url URL, --app M:A, --env NAME, --prod). The app is found as by backfill
# itself: --app, else BACKFILL_APP, else [tool.backfill] app in ./pyproject.toml.
#
# Answers are read from standard input: in development a pipe works. In prod without a terminal
# the script refuses (exit 2) unless --yes.
#
# Exit: 0 when the run and verify succeed; 2 when a question is answered no or the name is mistyped
# (the data unchanged; also in prod with no terminal and no --yes); otherwise the exit code of
# the backfill command that failed.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${BACKFILL_BIN:-}" ]]; then
  backfill=("$BACKFILL_BIN")
  python="$(dirname "$BACKFILL_BIN")/python"
elif [[ -x "$here/.venv/bin/backfill" ]]; then
  backfill=("$here/.venv/bin/backfill")
  python="$here/.venv/bin/python"
else
  backfill=(backfill)
  python="$(dirname "$(command -v backfill || echo /usr/bin/backfill)")/python"
fi
[[ -x "$python" ]] || python="python3"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

migration="body_to_parts"
yes=0
detach=0
prod_flag=0
env_option=""
url_option=""
passthrough=()
while (( $# )); do
  case "$1" in
    --yes) yes=1 ;;
    --detach) detach=1 ;;
    -h | --help) usage; exit 0 ;;
    --prod) prod_flag=1; passthrough+=("$1") ;;
    --env | --database-url | --app)
      if (( $# < 2 )); then
        echo "$1 needs a value" >&2
        exit 2
      fi
      [[ "$1" == "--env" ]] && env_option="$2"
      [[ "$1" == "--database-url" ]] && url_option="$2"
      passthrough+=("$1" "$2")
      shift
      ;;
    --env=*) env_option="${1#--env=}"; passthrough+=("$1") ;;
    --database-url=*) url_option="${1#--database-url=}"; passthrough+=("$1") ;;
    *) passthrough+=("$1") ;;
  esac
  shift
done

# The environment as backfill chooses it: --prod, else --env, else BACKFILL_ENV, else dev.
if (( prod_flag )); then
  environment="prod"
else
  environment="${env_option:-${BACKFILL_ENV:-dev}}"
fi
prod=0
[[ "$environment" == "prod" ]] && prod=1

if (( prod && !yes )) && [[ ! -t 0 ]]; then
  echo "Refusing: in prod this script asks questions and there is no terminal to answer them;" \
    "run it at a terminal, or pass --yes to answer every question yes. Nothing was changed." >&2
  exit 2
fi

bf() { "${backfill[@]}" "$@" "${passthrough[@]}"; }

step() {  # step ARGS...: run `backfill ARGS`; on failure say so and exit with its code
  local code=0
  bf "$@" || code=$?
  if (( code != 0 )); then
    echo "Stopping: \`backfill $1\` failed (exit $code)."
    exit "$code"
  fi
}

ask() {  # ask "question" -> 0 when the answer is yes
  local answer=""
  printf '%s [y/N] ' "$1"
  if (( yes )); then
    echo "yes (--yes)"
    return 0
  fi
  read -r answer || answer=""
  [[ -t 0 ]] || echo "${answer:-(no answer)}"  # from a pipe: show what was read
  [[ "$answer" =~ ^([yY]|[yY][eE][sS])$ ]]
}

# The database's URL with its password hidden (the raw URL is never printed): --database-url, else
# resolved as backfill resolves it (BACKFILL_DATABASE_URL, the environment's database_url).
target="$(
  SCRIPT_URL="$url_option" SCRIPT_ENV="$environment" "$python" -c '
import os
url = os.environ["SCRIPT_URL"]
try:
    if url:
        import sqlalchemy as sa
        print(sa.make_url(url).render_as_string(hide_password=True))
    else:
        from backfill.config import resolve
        from backfill.redaction import redact_url
        print(redact_url(resolve(environment=os.environ["SCRIPT_ENV"]).database_url))
except Exception:
    print("(not resolved: see the first command below)")
' 2>/dev/null
)" || target="(not resolved: see the first command below)"

echo "== Target =="
echo "Environment: $environment"
echo "Database:    $target"
echo
echo "== Current state =="
step status
step count "$migration"

if (( prod )); then
  echo
  echo "== Pre-production checklist =="
  for item in \
    "Is the UI fallback (chat_migrations.message_parts) deployed?" \
    "Has the migration been run successfully in development?" \
    "Is a recent backup of the whole database available (backfill's own backup of the tables it changes is offered next)?" \
    "Is this a low-traffic period?" \
    "Are monitoring, error tracking and logs open?"; do
    if ! ask "$item"; then
      echo "Stopping: finish the checklist first. Nothing was changed."
      exit 2
    fi
  done

  echo
  printf "Type the environment's name (%s) to go on: " "$environment"
  if (( yes )); then
    typed="$environment"
    echo "$typed (--yes)"
  else
    typed=""
    read -r typed || typed=""
    [[ -t 0 ]] || echo "$typed"
  fi
  if [[ "$typed" != "$environment" ]]; then
    echo "Stopping: '$typed' is not '$environment'. Nothing was changed."
    exit 2
  fi
fi

echo
echo "== Backup =="
backup_check=()
if ask "Back up the tables $migration changes now (backfill backup; no: go on without one)?"; then
  step backup "$migration"
else
  echo "Going on without a new backup (backfill's own question about it is answered: --no-backup-check)."
  backup_check=(--no-backup-check)
fi

echo
echo "== Dry run (first batch, nothing saved) =="
step run "$migration" --dry-run

echo
if ! ask "Run $migration now on $environment, with an undo log?"; then
  echo "Not run. Nothing was changed."
  exit 2
fi

prod_option=""
(( prod )) && prod_option=" --prod"
revert_hint="backfill revert $migration$prod_option"
code=0
if (( detach )); then
  echo "== Run (in the background) =="
  bf run "$migration" --undo --yes "${backup_check[@]}" --detach || code=$?
  if (( code == 0 )); then
    echo "== Following it (backfill wait; Ctrl-C stops following, not the run) =="
    bf wait "$migration" || code=$?
  fi
else
  echo "== Run =="
  bf run "$migration" --undo --yes "${backup_check[@]}" || code=$?
fi
if (( code != 0 )); then
  echo "$migration stopped (exit $code). Legacy fields are intact; fix the cause, then run this"
  echo "script again: the migration resumes from its last committed batch. To put back what it"
  echo "changed: $revert_hint"
  exit "$code"
fi

echo
echo "== Verify =="
verified=0
bf verify "$migration" || verified=$?
echo
echo "== Status =="
step status
echo
if (( verified == 0 )); then
  echo "Done. Check old conversations in the app (user and assistant messages, with reasoning)."
  echo "To roll back: $revert_hint"
  echo "Wait at least one week, then remove the legacy fields with:"
  echo "  backfill run cleanup_legacy_fields$prod_option"
else
  echo "Rows are left or raising (see above; exit $verified); investigate before any cleanup."
  exit "$verified"
fi
