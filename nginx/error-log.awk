# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx's error log as JSON: one object per line, nothing lost or merged   │
# └──────────────────────────────────────────────────────────────────────────┘
# nginx has no JSON error log: each line is plain text
#   2026/12/01 11:09:58 [error] 52#52: *20 <message>[ while <action>], client: …,
#   server: …, request: "…", upstream: "…", host: "…", referrer: "…"
# (ngx_log_error_core + ngx_http_log_error). The supervisor (nginx/supervisor.sh) runs
# nginx with its stderr on a FIFO that this script reads: every line becomes one JSON
# object with the stack's core keys (timestamp, level = nginx's own, logger, event),
# pid/tid/connection, and the context fields nginx appends. nginx writes a line with one
# write() of at most 2 KiB (NGX_MAX_ERROR_STR), under PIPE_BUF, so lines of different
# workers never interleave in the FIFO; this script is the only writer of the container's
# stderr and flushes each line, so none is merged or held back either.
# Lines that are JSON already (the supervisor's own) pass through untouched; lines in no
# format nginx writes (a tool's complaint) are kept whole as the event of an "error".
# Run with LC_ALL=C: bytes, not characters. Bytes outside printable ASCII (control
# characters, anything a client sent that is not ASCII) become \u00XX escapes, so every
# line is valid JSON and valid UTF-8 whatever a client puts in a request line.
# Variables: -v tz=+00:00 (the offset of nginx's local time, `date +%:z`).
# https://nginx.org/en/docs/ngx_core_module.html#error_log
# https://github.com/nginx/nginx/blob/master/src/core/ngx_log.c (the line format)

BEGIN {
    if (tz == "") tz = "+00:00"
    for (i = 1; i < 256; i++) {
        c = sprintf("%c", i)
        if (i < 32 || i >= 127) escaped[c] = sprintf("\\u%04x", i)
    }
    escaped["\\"] = "\\\\"
    escaped["\""] = "\\\""
    escaped["\n"] = "\\n"
    escaped["\r"] = "\\r"
    escaped["\t"] = "\\t"
    # The context nginx appends, in the order it appends it (read back from the end).
    nkeys = split("client server request subrequest upstream host referrer", keys, " ")
    quoted["request"] = quoted["subrequest"] = quoted["upstream"] = 1
    quoted["host"] = quoted["referrer"] = 1
}

function json(s,    out, i, n, c) {
    if (s !~ /[\\"\001-\037\177-\377]/) return s
    out = ""
    n = length(s)
    for (i = 1; i <= n; i++) {
        c = substr(s, i, 1)
        out = out ((c in escaped) ? escaped[c] : c)
    }
    return out
}

function last_index(s, t,    at, p) {
    at = 0
    while ((p = index(substr(s, at + 1), t)) > 0) at += p
    return at
}

function now() { return strftime("%Y-%m-%dT%H:%M:%S", systime(), 1) "+00:00" }

function emit(ts, level, logger, event, extra) {
    printf "{\"timestamp\":\"%s\",\"level\":\"%s\",\"logger\":\"%s\",\"event\":\"%s\"%s}\n",
        ts, level, logger, json(event), extra
    fflush()
}

# Already a JSON object: the supervisor's and the entrypoint's own lines.
/^\{.*\}$/ { print; fflush(); next }

# The error log proper: "YYYY/MM/DD HH:MM:SS [level] pid#tid: [*connection ]message".
/^[0-9][0-9][0-9][0-9]\/[0-9][0-9]\/[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9] \[[a-z]+\] [0-9]+#[0-9]+: / {
    ts = substr($0, 1, 4) "-" substr($0, 6, 2) "-" substr($0, 9, 2) "T" substr($0, 12, 8) tz
    rest = substr($0, 22)
    close_bracket = index(rest, "]")
    level = substr(rest, 1, close_bracket - 1)
    rest = substr(rest, close_bracket + 2)
    colon = index(rest, ": ")
    split(substr(rest, 1, colon - 1), ids, "#")
    msg = substr(rest, colon + 2)
    extra = ",\"pid\":" ids[1] ",\"tid\":" ids[2]
    if (match(msg, /^\*[0-9]+ /)) {
        extra = extra ",\"connection\":" substr(msg, 2, RLENGTH - 2)
        msg = substr(msg, RLENGTH + 1)
    }
    fields = ""
    for (k = nkeys; k >= 1; k--) {
        marker = ", " keys[k] ": "
        at = last_index(msg, marker)
        if (at == 0) continue
        value = substr(msg, at + length(marker))
        if ((keys[k] in quoted) && value ~ /^".*"$/) value = substr(value, 2, length(value) - 2)
        msg = substr(msg, 1, at - 1)
        fields = ",\"" keys[k] "\":\"" json(value) "\"" fields
    }
    # "connect() failed (111: Connection refused) while connecting to upstream"
    if (match(msg, /\([0-9]+: [^)]*\)/)) {
        errno = substr(msg, RSTART + 1)
        extra = extra ",\"errno\":" substr(errno, 1, index(errno, ":") - 1)
    }
    emit(ts, level, "nginx.error", msg, extra fields)
    next
}

# Before the error log is open (start-up, `nginx -t`): "nginx: [level] message" or,
# without a level, "nginx: message" (e.g. "the configuration file … syntax is ok").
/^nginx: \[[a-z]+\] / {
    close_bracket = index($0, "]")
    emit(now(), substr($0, 9, close_bracket - 9), "nginx.error", substr($0, close_bracket + 2), "")
    next
}
/^nginx: / {
    emit(now(), "notice", "nginx.error", substr($0, 8), "")
    next
}

# Anything else on the stderr of nginx or the supervisor: kept whole, flagged.
/./ { emit(now(), "error", "nginx.stderr", $0, "") }
