#!/bin/sh
# The project's tests: what "done" means, run in the workspace after each iteration.
got=$(sh calc.sh add 2 3)
if [ "$got" != 5 ]; then
  echo "FAIL: add 2 3 gave $got, want 5"
  exit 1
fi
echo "ok: add 2 3 = 5"
