#!/usr/bin/env bash
# The runbook's interactive migration of messages to parts, over the backfill CLI.
#
#   ./scripts/production-migration.sh            # development database
#   ./scripts/production-migration.sh --prod     # production: checklist and confirmations first
#
# Other options are passed to every backfill command (e.g. --database-url URL, --app M:A).
# The app (the flagship's body_to_parts and cleanup_legacy_fields) is found as by backfill
# itself: --app, else BACKFILL_APP, else [tool.backfill] app in ./pyproject.toml, as in this
# repository's; with none, the first command says so and the script stops (exit 2).
# Answers are read from standard input, so the script can also be driven by a pipe.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${BACKFILL_BIN:-}" ]]; then
  backfill=("$BACKFILL_BIN")
elif [[ -x "$here/.venv/bin/backfill" ]]; then
  backfill=("$here/.venv/bin/backfill")
else
  backfill=(backfill)
fi

prod=0
passthrough=()
for arg in "$@"; do
  [[ "$arg" == "--prod" ]] && prod=1
  passthrough+=("$arg")
done

ask() {  # ask "question" -> 0 when the answer is yes
  local answer
  printf '%s [y/N] ' "$1"
  read -r answer || answer=""
  [[ "$answer" == "y" || "$answer" == "Y" || "$answer" == "yes" ]]
}

bf() { "${backfill[@]}" "$@" "${passthrough[@]}"; }

if (( prod )); then
  echo "== Pre-production checklist =="
  for item in \
    "Is the UI fallback (message_parts) deployed?" \
    "Has the migration been run successfully in development?" \
    "Does a recent database backup exist?" \
    "Is this a low-traffic period?" \
    "Are monitoring, error tracking and logs open?"; do
    if ! ask "$item"; then
      echo "Stopping: finish the checklist first. Nothing was changed."
      exit 2
    fi
  done
fi

echo "== Current state =="
bf status
bf count body_to_parts

echo "== Dry run (first batch, nothing saved) =="
bf run body_to_parts --dry-run

if ! ask "Run body_to_parts now?"; then
  echo "Not run. Nothing was changed."
  exit 2
fi

set +e
bf run body_to_parts --yes
code=$?
set -e
if (( code != 0 )); then
  echo "body_to_parts stopped (exit $code). Legacy fields are intact; fix the cause, then run this"
  echo "script again: the migration resumes from its last committed batch."
  exit "$code"
fi

echo "== Verify =="
if bf verify body_to_parts; then
  echo
  echo "Done. Check old conversations in the app (user and assistant messages, with reasoning)."
  echo "Wait at least one week, then remove the legacy fields with:"
  echo "  backfill run cleanup_legacy_fields$( (( prod )) && echo ' --prod')"
else
  echo "Rows are left (see above); investigate before any cleanup."
  exit 1
fi
