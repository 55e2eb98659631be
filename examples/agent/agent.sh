#!/bin/sh
# A stand-in for a coding agent: it edits the code, and on the next iteration reads the
# feedback drover gives it (the failed criteria with the tail of their output) and fixes what
# the tests complained about. A real agent would hand $DROVER_FEEDBACK_FILE to its model.
set -eu
echo "iteration $DROVER_ITERATION (attempt $DROVER_ATTEMPT)"
if [ -z "${DROVER_FEEDBACK_FILE:-}" ]; then
  # First try: a plausible but wrong edit (an off-by-one in add).
  sed 's/$2 + $3/$2 + $3 + 1/' calc.sh.orig > calc.sh
  echo "edited calc.sh"
else
  echo "feedback from iteration $(sed -n 's/.*"iteration":\([0-9]*\).*/\1/p' "$DROVER_FEEDBACK_FILE"):"
  cat "$DROVER_FEEDBACK_FILE"; echo
  if grep -q 'add 2 3' "$DROVER_FEEDBACK_FILE"; then
    cp calc.sh.orig calc.sh
    echo "fixed add in calc.sh"
  fi
fi
mkdir -p out
cp calc.sh out/calc.sh
