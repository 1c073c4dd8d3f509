#!/usr/bin/env bash
# Verse text of a King James range (Debian's bible-kjv), one verse per line,
# without the "Book1:1" references: the calibration and evaluation texts.
#
#   bash scripts/kjv-text.sh Rev1:1-Rev22:21 > revelation.txt
set -euo pipefail
bible -f "$1" | sed 's/^[^ ]* //'
