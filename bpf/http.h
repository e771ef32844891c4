/* HTTP/1.x in clear text, counted by the pods tc programs (pods.c with
 * -DFOVEA_HTTP), so HTTP costs no extra program per packet.
 *
 * Reached only by TCP packets of the HTTP ports (HTTP_PORT(p), a compare
 * chain set from user space, or every port with HTTP_ALL_PORTS). Before the
 * chain, HTTP_PORT_MASK has a bit for the low 6 bits of each HTTP port: a port
 * whose bit is clear (most: 5 bits of 64 with the default ports) is let go
 * after a shift and a test, so any other packet pays two of those (and the
 * chains only now and then) and no map operation. Of each such packet
 * with a payload only the first bytes are read (HTTP_PEEK), from the linear
 * part of the skb when they are there, else with one bpf_skb_load_bytes (a
 * pod's TCP payload usually sits in page fragments):
 * - `HTTP/1.x NNN` is a status line, its first digit the status class;
 * - GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS and a space start a request
 *   line; another uppercase token and a space is method OTHER when the line
 *   ends with ` HTTP/1.x` within HTTP_LINE_MAX bytes (read into a per-CPU
 *   scratch buffer: only for such tokens);
 * - a payload that starts with an uppercase letter or `HTTP/` and is neither
 *   is a reject, counted by reason; any other payload (a body, the rest of a
 *   message, another protocol) is not looked at further.
 *
 * Request and response are matched per connection in http_inflight, keyed by
 * (client, server, ports): the request's first byte inserts the entry, the
 * response's first byte takes it, counts the request by (pair, method, status
 * class) and its duration in a log2 histogram per pair. The entry remembers
 * the interface where it was made; a packet of the same connection seen at
 * another pod interface of this node is left to that one. User space names
 * the pair and keeps one count per cluster (agent/plugins/http.py).
 * Keep-alive connections make one entry per request. A second request before
 * the response (pipelining) is counted at once with status class none (its
 * response cannot be told from the first's), and so is every later request of
 * that connection. A request whose connection ends (the server's FIN, or a
 * RST) before its response is counted with status class none; user space
 * takes those older than http.timeout (an atomic lookup-and-delete), so a
 * response racing the expiry is counted once, one way or the other. A status
 * line that cannot be parsed answers its request with status class none.
 *
 * A sampled share of the requests counted also goes up the http_events ring
 * buffer, one record each, for spans and `fovea observe` (agent/plugins/http.py):
 * no packet pays for it, only a counted request that is sampled. Whether a
 * request is sampled is a hash of its first byte's time (http_sampled), so the
 * request's packet and the one that counts it agree without storing a flag;
 * with HTTP_PATH_BYTES set (http.urlPath), the request's packet sends up the
 * first bytes of its request line (struct http_path_event) for url.path.
 *
 * Set from user space (-D): HTTP_PORT(p) and HTTP_PORT_MASK, or HTTP_ALL_PORTS, HTTP_COUNT_SIZE,
 * HTTP_INFLIGHT_SIZE, HTTP_DURATION_BASE_NS (upper bound of the first
 * duration bucket; each next bucket doubles it), HTTP_DURATION_BUCKETS,
 * HTTP_SAMPLE_THRESHOLD (0..2^32; 0: no records), HTTP_PATH_BYTES (a power of
 * two up to HTTP_LINE_MAX; unset: no request lines).
 */
#ifndef FOVEA_HTTP_H
#define FOVEA_HTTP_H

#define HTTP_PEEK 16       /* bytes read of every HTTP-port payload */
#define HTTP_LINE_MAX 256  /* how far an OTHER method's request line is searched for its end */

#ifdef HTTP_ALL_PORTS
#define HTTP_PORT(p) ((p) != 0)
#define HTTP_PORT_MASK (~0ULL)
#endif
#define HTTP_MAYBE_PORT(p) ((HTTP_PORT_MASK >> ((p) & 63)) & 1)

/* Methods (index in agent/plugins/http.py METHODS). */
#define HTTP_OTHER 0
#define HTTP_GET 1
#define HTTP_POST 2
#define HTTP_PUT 3
#define HTTP_DELETE 4
#define HTTP_PATCH 5
#define HTTP_HEAD 6
#define HTTP_OPTIONS 7

#define HTTP_STATUS_NONE 0 /* no response, or one that could not be parsed; else 1..5 */

/* What the first bytes of a payload are. */
#define HTTP_CONTINUATION 0 /* not the start of a message we know: left alone */
#define HTTP_REQUEST 1
#define HTTP_RESPONSE 2
#define HTTP_REJECTED 3

/* Index into http_stats (names in agent/plugins/http.py). */
#define HTTP_REJECT_STATUS_LINE 0  /* starts with HTTP/ but is no `HTTP/1.x NNN` status line */
#define HTTP_REJECT_REQUEST_LINE 1 /* starts with an uppercase letter but is no request line */
#define HTTP_UNMATCHED 2           /* a status line with no request in flight on its connection */
#define HTTP_PIPELINED 3           /* a request sent before the previous one's response */
#define HTTP_INFLIGHT_FULL 4       /* a request not tracked (counted at once, status class none) */
#define HTTP_COUNTS_FULL 5         /* a request or duration not counted: the table is full */
#define HTTP_EVENTS_FULL 6         /* a sampled request's record lost: the ring buffer is full */
#define HTTP_STATS 7
#define HTTP_EVENT_PAGES 64        /* http_events: ~3,600 requests between two reads (~650 with lines) */

struct http_conn {
    u8 family;
    u8 pad[3];
    u16 client_port; /* host order */
    u16 server_port;
    u8 client[16];
    u8 server[16];
};

struct http_request {
    u64 ts;      /* bpf_ktime_get_ns() of the request's first byte */
    u32 ifindex; /* where it is tracked: the connection's other packets are counted there */
    u8 method;
    u8 to_pod;    /* seen sent to the pod (the server's side), else sent by it (the client's) */
    u8 inflight;  /* a request awaits its response */
    u8 pipelined; /* the connection pipelined: its requests are counted at once */
};

struct http_count_key {
    u8 family;
    u8 to_pod;
    u8 method;
    u8 status; /* class 1..5, or HTTP_STATUS_NONE */
    u8 client[16];
    u8 server[16];
};

struct http_duration_key {
    u8 family;
    u8 to_pod;
    u8 bucket; /* 0..HTTP_DURATION_BUCKETS-1, HTTP_DURATION_BUCKETS: +Inf */
    u8 pad;
    u8 client[16];
    u8 server[16];
};

/* A sampled request, as it was counted (agent/plugins/http.py HttpEvent). */
struct http_event {
    u64 ts;       /* bpf_ktime_get_ns() of the request's first byte */
    u64 duration; /* ns to the response's first byte; 0 without a status code */
    struct http_conn conn;
    u32 ifindex;
    u16 status;   /* 100..599, 0: none */
    u8 method;
    u8 to_pod;
};

/* A sampled request's line (with HTTP_PATH_BYTES), sent before its http_event. */
struct http_path_event {
    u64 ts; /* the request's first byte: with conn, names its http_event */
    struct http_conn conn;
    u32 length; /* bytes of line that hold the payload's first bytes */
    u32 pad;
    u8 line[HTTP_LINE_MAX];
};

struct http_line {
    u8 b[HTTP_LINE_MAX];
};

/* Kept across a restart (bpf/fovea.h): counts, requests in flight, the cumulative stats. */
FOVEA_COUNTING_TABLE("hash", struct http_conn, struct http_request, http_inflight, HTTP_INFLIGHT_SIZE);
FOVEA_COUNTING_TABLE("percpu_hash", struct http_count_key, struct fovea_counter, http_counts,
                     HTTP_COUNT_SIZE); /* packets: requests */
FOVEA_COUNTING_TABLE("percpu_hash", struct http_duration_key, struct fovea_counter, http_durations,
                     HTTP_COUNT_SIZE); /* packets: requests, bytes: ns */
FOVEA_COUNTING_TABLE("percpu_array", int, u64, http_stats, HTTP_STATS);
BPF_PERCPU_ARRAY(http_scratch, struct http_line, 1);
FOVEA_RINGBUF(http_events, HTTP_EVENT_PAGES);
#ifdef HTTP_PATH_BYTES
BPF_PERCPU_ARRAY(http_path_scratch, struct http_path_event, 1);
#endif

/* Is the request whose first byte came at `ts` (ns) sampled? A multiplicative hash:
 * the nanoseconds' low bits spread over the top 32 bits, compared with the threshold. */
static __always_inline int http_sampled(u64 ts)
{
    return HTTP_SAMPLE_THRESHOLD && ((ts * 0x9E3779B97F4A7C15ULL) >> 32) < (u64)HTTP_SAMPLE_THRESHOLD;
}

static __always_inline void http_stat(int reason)
{
    fovea_map_op();
    u64 *v = http_stats.lookup(&reason);
    if (v)
        *v += 1;
}

/* Four bytes as one little-endian word, to compare a payload's first bytes at once. */
#define HTTP_W(a, b, c, d) ((u32)(a) | (u32)(b) << 8 | (u32)(c) << 16 | (u32)(d) << 24)

/* An OTHER method's request line: does it end with " HTTP/1.0" or " HTTP/1.1"
 * within HTTP_LINE_MAX bytes? */
static __always_inline int http_line_is_http(struct __sk_buff *skb, u32 off, u32 end)
{
    int zero = 0;
    fovea_map_op();
    struct http_line *l = http_scratch.lookup(&zero);
    if (!l)
        return 0;
    u32 n = (end - off) & 0xffff; /* a bound the verifier sees on the very register it checks */
    if (n > HTTP_LINE_MAX)
        n = HTTP_LINE_MAX;
    if (n < 10 || bpf_skb_load_bytes(skb, off, l->b, n) < 0)
        return 0;
    /* The first CR or LF: found a word (8 bytes) at a time, which keeps the loop
     * short for the verifier, then the byte within the word. */
    const u64 ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    u32 word = HTTP_LINE_MAX / 8;
#pragma clang loop unroll(disable)
    for (u32 w = 0; w < HTTP_LINE_MAX / 8; w++) {
        if (w * 8 >= n)
            break;
        u64 x, cr, lf;
        __builtin_memcpy(&x, &l->b[w * 8], 8);
        cr = x ^ 0x0d0d0d0d0d0d0d0dULL;
        lf = x ^ 0x0a0a0a0a0a0a0a0aULL;
        if (((cr - ones) & ~cr & highs) | ((lf - ones) & ~lf & highs)) {
            word = w;
            break;
        }
    }
    if (word >= HTTP_LINE_MAX / 8)
        return 0;
    u32 eol = 0, base = (word * 8) & (HTTP_LINE_MAX - 1);
#pragma unroll
    for (u32 k = 0; k < 8; k++) {
        u8 c = l->b[(base + k) & (HTTP_LINE_MAX - 1)];
        if (c == '\r' || c == '\n') {
            eol = base + k;
            break;
        }
    }
    if (eol >= n) /* past the payload: what an earlier packet left in the buffer */
        return 0;
    eol &= HTTP_LINE_MAX - 1;
    if (eol < 9)
        return 0;
    u8 *t = &l->b[eol - 9];
    return t[0] == ' ' && t[1] == 'H' && t[2] == 'T' && t[3] == 'T' && t[4] == 'P' && t[5] == '/' &&
           t[6] == '1' && t[7] == '.' && (t[8] == '0' || t[8] == '1');
}

/* What the payload at off..end starts with; *what: the method, the status
 * class, or the reject reason; *code: a response's status code. Bytes past the
 * payload read as 0 and match nothing. */
static __always_inline int http_parse(struct __sk_buff *skb, u32 off, u32 end, u8 *what, u16 *code)
{
    u8 b[HTTP_PEEK] = {};
    u32 n = (end - off) & 0xffff; /* a bound the verifier sees on the very register it checks */
    void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
    if (n >= HTTP_PEEK) {
        n = HTTP_PEEK;
        if (off <= 256 && data + off + HTTP_PEEK <= data_end)
            __builtin_memcpy(b, data + off, HTTP_PEEK);
        else if (bpf_skb_load_bytes(skb, off, b, HTTP_PEEK) < 0)
            return HTTP_CONTINUATION;
    } else {
        n &= HTTP_PEEK - 1;
        if (n == 0 || bpf_skb_load_bytes(skb, off, b, n) < 0)
            return HTTP_CONTINUATION;
    }
    u32 w = HTTP_W(b[0], b[1], b[2], b[3]);

    if (w == HTTP_W('H', 'T', 'T', 'P') && b[4] == '/') {
        *what = HTTP_REJECT_STATUS_LINE;
        if (b[5] != '1' || b[6] != '.' || (b[7] != '0' && b[7] != '1') || b[8] != ' ')
            return HTTP_REJECTED;
        if (b[9] < '1' || b[9] > '5' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
            return HTTP_REJECTED;
        if (n > 12 && b[12] != ' ' && b[12] != '\r')
            return HTTP_REJECTED;
        *what = b[9] - '0';
        *code = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
        return HTTP_RESPONSE;
    }
    if (b[0] < 'A' || b[0] > 'Z')
        return HTTP_CONTINUATION;

    *what = w == HTTP_W('G', 'E', 'T', ' ') ? HTTP_GET
          : w == HTTP_W('P', 'O', 'S', 'T') && b[4] == ' ' ? HTTP_POST
          : w == HTTP_W('P', 'U', 'T', ' ') ? HTTP_PUT
          : w == HTTP_W('D', 'E', 'L', 'E') && b[4] == 'T' && b[5] == 'E' && b[6] == ' ' ? HTTP_DELETE
          : w == HTTP_W('P', 'A', 'T', 'C') && b[4] == 'H' && b[5] == ' ' ? HTTP_PATCH
          : w == HTTP_W('H', 'E', 'A', 'D') && b[4] == ' ' ? HTTP_HEAD
          : w == HTTP_W('O', 'P', 'T', 'I') && b[4] == 'O' && b[5] == 'N' && b[6] == 'S' && b[7] == ' '
              ? HTTP_OPTIONS
          : HTTP_OTHER;
    if (*what != HTTP_OTHER)
        return HTTP_REQUEST;
    /* Another method: an uppercase token, a space, and a line that ends like HTTP/1.x's. */
    u32 sp = 0;
#pragma unroll
    for (u32 i = 1; i < HTTP_PEEK; i++) {
        u8 c = b[i];
        if (c == ' ') {
            sp = i;
            break;
        }
        if ((c < 'A' || c > 'Z') && c != '-' && c != '_')
            break;
    }
    if (sp && http_line_is_http(skb, off, end))
        return HTTP_REQUEST;
    *what = HTTP_REJECT_REQUEST_LINE;
    return HTTP_REJECTED;
}

/* The connection of a packet, oriented client -> server. */
static __always_inline void http_conn_of(struct http_conn *c, struct fovea_packet *pkt, int from_client)
{
    c->family = pkt->family;
    if (from_client) {
        c->client_port = pkt->sport;
        c->server_port = pkt->dport;
        __builtin_memcpy(c->client, pkt->saddr, 16);
        __builtin_memcpy(c->server, pkt->daddr, 16);
    } else {
        c->client_port = pkt->dport;
        c->server_port = pkt->sport;
        __builtin_memcpy(c->client, pkt->daddr, 16);
        __builtin_memcpy(c->server, pkt->saddr, 16);
    }
}

/* One request, by pair, method and status class; an answered one's duration too. */
static __always_inline void http_count(struct http_conn *c, u8 to_pod, u8 method, u8 status, u64 ns)
{
    struct http_count_key k = {.family = c->family, .to_pod = to_pod, .method = method, .status = status};
    __builtin_memcpy(k.client, c->client, 16);
    __builtin_memcpy(k.server, c->server, 16);
    struct fovea_counter zero = {};
    fovea_map_op();
    struct fovea_counter *v = http_counts.lookup_or_try_init(&k, &zero);
    if (!v) {
        http_stat(HTTP_COUNTS_FULL);
        return;
    }
    v->packets += 1;
    if (status == HTTP_STATUS_NONE)
        return;
    u8 bucket = HTTP_DURATION_BUCKETS; /* +Inf */
    u64 bound = HTTP_DURATION_BASE_NS;
#pragma clang loop unroll(disable)
    for (u8 i = 0; i < HTTP_DURATION_BUCKETS; i++) {
        if (ns <= bound) {
            bucket = i;
            break;
        }
        bound <<= 1;
    }
    struct http_duration_key d = {.family = c->family, .to_pod = to_pod, .bucket = bucket};
    __builtin_memcpy(d.client, c->client, 16);
    __builtin_memcpy(d.server, c->server, 16);
    fovea_map_op();
    v = http_durations.lookup_or_try_init(&d, &zero);
    if (!v) {
        http_stat(HTTP_COUNTS_FULL);
        return;
    }
    v->packets += 1;
    v->bytes += ns;
}

/* What one packet makes countable: a request, with its status class and duration. */
struct http_outcome {
    u64 ts; /* the request's first byte */
    u64 ns;
    u16 code; /* the status code, 0: none */
    u8 count; /* 1: count it */
    u8 to_pod;
    u8 method;
    u8 status;
    s8 stat; /* an http_stats index to add one to, or -1 */
};

/* The first bytes of a sampled request's line, for url.path. */
static __always_inline void http_send_line(struct __sk_buff *skb, struct http_conn *c, u64 now, u32 off, u32 end)
{
#ifdef HTTP_PATH_BYTES
    if (!http_sampled(now))
        return;
    int zero = 0;
    fovea_map_op();
    struct http_path_event *ev = http_path_scratch.lookup(&zero);
    if (!ev)
        return;
    u32 n = (end - off) & 0xffff; /* a bound the verifier sees on the very register it checks */
    if (n > HTTP_PATH_BYTES)
        n = HTTP_PATH_BYTES;
    if (n == 0 || bpf_skb_load_bytes(skb, off, ev->line, n) < 0)
        return;
    ev->ts = now;
    ev->conn = *c;
    ev->length = n;
    if (http_events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
        http_stat(HTTP_EVENTS_FULL);
#endif
}

static __always_inline void http_on_request(struct __sk_buff *skb, struct http_conn *c, u8 method, u8 to_pod,
                                            u64 now, u32 off, u32 end, struct http_outcome *out)
{
    struct http_request r = {.ts = now, .ifindex = skb->ifindex, .method = method, .to_pod = to_pod,
                             .inflight = 1};
    fovea_map_op();
    if (http_inflight.insert(c, &r) == 0) {
        http_send_line(skb, c, now, off, end);
        return;
    }
    fovea_map_op();
    struct http_request *e = http_inflight.lookup(c);
    if (e) {
        if (e->ifindex != skb->ifindex)
            return; /* tracked at the interface that saw it first */
        /* The connection has a request in flight, or pipelined before. */
        e->pipelined = 1;
        e->ts = now;
    }
    out->stat = e ? HTTP_PIPELINED : HTTP_INFLIGHT_FULL;
    out->count = 1;
    out->ts = now;
    http_send_line(skb, c, now, off, end);
    out->to_pod = to_pod;
    out->method = method;
}

static __always_inline void http_on_response(struct __sk_buff *skb, struct http_conn *c, u8 status, u16 code,
                                             u64 now, struct http_outcome *out)
{
    fovea_map_op();
    struct http_request *e = http_inflight.lookup(c);
    if (!e) {
        if (out->stat < 0) /* a status line that was rejected is counted as that */
            out->stat = HTTP_UNMATCHED;
        return;
    }
    if (e->ifindex != skb->ifindex || !e->inflight)
        return; /* tracked elsewhere, or answers a pipelined request counted already */
    struct http_request r = *e;
    if (r.pipelined) {
        e->inflight = 0; /* the pipelined requests' responses follow */
    } else {
        fovea_map_op();
        if (http_inflight.delete(c) != 0)
            return; /* expired meanwhile: counted as unanswered */
    }
    out->count = 1;
    out->to_pod = r.to_pod;
    out->method = r.method;
    out->status = status;
    out->code = status == HTTP_STATUS_NONE ? 0 : code;
    out->ts = r.ts;
    out->ns = now > r.ts ? now - r.ts : 0;
}

/* The server's FIN, or a RST, ends what the connection has in flight. */
static __always_inline void http_end(struct __sk_buff *skb, struct fovea_packet *pkt, struct http_conn *c,
                                     struct http_outcome *out)
{
    http_conn_of(c, pkt, 0); /* the sender as the server */
    fovea_map_op();
    struct http_request *e = http_inflight.lookup(c);
    if (!e && (pkt->tcp_flags & 0x04)) { /* a RST: from the client, maybe */
        http_conn_of(c, pkt, 1);
        fovea_map_op();
        e = http_inflight.lookup(c);
    }
    if (!e || e->ifindex != skb->ifindex)
        return;
    struct http_request r = *e;
    fovea_map_op();
    if (http_inflight.delete(c) == 0 && r.inflight) {
        out->count = 1;
        out->ts = r.ts;
        out->to_pod = r.to_pod;
        out->method = r.method;
    }
}

/* A sampled request's record for user space (spans, `fovea observe`). */
static __always_inline void http_sample(struct __sk_buff *skb, struct http_conn *c, struct http_outcome *out)
{
    if (!http_sampled(out->ts))
        return;
    struct http_event ev = {.ts = out->ts, .duration = out->code ? out->ns : 0, .conn = *c,
                            .ifindex = skb->ifindex, .status = out->code, .method = out->method,
                            .to_pod = out->to_pod};
    if (http_events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
        http_stat(HTTP_EVENTS_FULL);
}

/* Count one packet seen at a pod interface; to_pod: sent to the pod. */
static __always_inline void fovea_http(struct __sk_buff *skb, struct fovea_packet *pkt, int to_pod)
{
    if (pkt->l4proto != IPPROTO_TCP || !pkt->l4_offset)
        return;
    u16 sport = pkt->sport, dport = pkt->dport;
    if (!(HTTP_MAYBE_PORT(sport) && HTTP_PORT(sport)) && !(HTTP_MAYBE_PORT(dport) && HTTP_PORT(dport)))
        return;
    struct http_conn c = {};
    struct http_outcome out = {.stat = -1};
    u32 off = pkt->l4_offset + (pkt->tcp_doff >> 4) * 4, end = pkt->end;
    if (off < end) {
        u8 what = 0;
        u16 code = 0;
        int kind = http_parse(skb, off, end, &what, &code);
        if (kind == HTTP_REJECTED)
            out.stat = what;
        if (kind == HTTP_REQUEST || kind == HTTP_RESPONSE ||
            (kind == HTTP_REJECTED && what == HTTP_REJECT_STATUS_LINE)) {
            u64 now = bpf_ktime_get_ns();
            http_conn_of(&c, pkt, kind == HTTP_REQUEST);
            if (kind == HTTP_REQUEST)
                http_on_request(skb, &c, what, to_pod, now, off, end, &out);
            else
                http_on_response(skb, &c, kind == HTTP_RESPONSE ? what : HTTP_STATUS_NONE, code, now, &out);
        }
    }
    /* A FIN or RST in a segment that also counted (a response with FIN): the next one ends it. */
    if (!out.count && (pkt->tcp_flags & 0x05)) /* FIN, RST */
        http_end(skb, pkt, &c, &out);
    if (out.stat >= 0)
        http_stat(out.stat);
    if (out.count) {
        http_count(&c, out.to_pod, out.method, out.status, out.ns);
        http_sample(skb, &c, &out);
    }
}

#endif
