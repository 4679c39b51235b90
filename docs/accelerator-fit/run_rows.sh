#!/bin/bash
# The fit table's compiles (docs/accelerator-fit.md): each row is one dry run, as a user would run it. Run from the
# repository root with the `compile` extra installed: bash docs/accelerator-fit/run_rows.sh ROWS_FILE OUT_DIR
# Each ROWS_FILE line: NAME CONFIG TARGET [--config.KEY=VALUE ...]. Writes OUT_DIR/NAME/dry_run.json and
# OUT_DIR/NAME.log (the report, the one-line error if it does not fit, and the wall time).
set -u
rows=$1
out=$2
mkdir -p "$out"
while read -r name config target flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  [[ -e "$out/$name/dry_run.json" ]] && continue  # done in an earlier pass
  start=$(date +%s)
  python -m dispersion_jax train --config "$config" --workdir "$out/$name" --config.dry_run=True \
    --config.dry_run_target="$target" $flags > "$out/$name.log" 2>&1
  echo "exit $? wall $(( $(date +%s) - start )) s" >> "$out/$name.log"
  tail -1 "$out/$name.log"
done < "$rows"
