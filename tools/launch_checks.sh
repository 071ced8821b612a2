# Sourced by tools/{dist,slurm}_{train,test}.sh: the checks of their
# environment variables and arguments, in one place.

# Counts that are not whole numbers fail much later (a traceback or
# a bare AssertionError): refuse them here with one line.
need_int() {  # NAME VALUE MIN HINT
  case "$2" in
    '' | *[!0-9]*) ;;
    *) [ "$2" -ge "$3" ] && return 0 ;;
  esac
  echo "error: $1 must be a whole number >= $3$4; got '$2'." >&2
  exit 2
}
