#!/bin/sh
# Protocol 3 of the conversion and CKA studies (issue 33), in the order: the validation grid, then the
# headline rows (5 seeds) and the loss-form control with the grid's winners, then the CKA-plan pair (5 seeds) and
# the CKA maps and stand-in on the same frozen original. Every step resumes (finished runs are skipped) and
# processes share the queue through locks: start one per core from the repository root of a clean checkout,
#     OMP_NUM_THREADS=1 setsid nohup nice -n 10 sh bench/protocol3.sh 1 > logs/protocol3_1.log 2>&1 &
#     OMP_NUM_THREADS=1 setsid nohup nice -n 10 sh bench/protocol3.sh 2 > logs/protocol3_2.log 2>&1 &
# Worker 1 alone runs the CKA maps and stand-in (one unit each, not shared).
set -e
py=.venv/bin/python
for plan in grid headline loss-form; do
    $py -m bench.conversion_study --plan "$plan" --out bench/results/conversion/protocol3
done
$py -m bench.cka_study --parts plans --rows kdna-r4-pairs kdna-r4-pairs-cka --seeds 0 1 2 3 4 \
    --out bench/results/cka/protocol3
if [ "${1:-1}" = 1 ]; then
    $py -m bench.cka_study --parts maps stand-in --out bench/results/cka/protocol3
fi
