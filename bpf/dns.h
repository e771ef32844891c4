/* DNS on port 53 (UDP and TCP), counted by the tc programs that include this
 * header (pods.c, forward.c with -DFOVEA_DNS), so DNS costs no extra program
 * per packet.
 *
 * Every byte comes off the wire: the parser reads the fixed 12-byte header
 * (id, flags, counts), walks the first QNAME with a bounded loop to reach the
 * qtype, and counts what it cannot parse as a reject, by reason. It reads in
 * place (fovea_read): a helper call per label cost more than the rest of
 * the parse.
 *
 * Once per node (DESIGN.md): a message is counted at the sending pod's
 * interface when the sender is local, else at the receiving pod's interface,
 * else at the uplink. The includer says whether a packet was already seen at
 * such a point (dns_counted_elsewhere). A query is remembered in dns_inflight under
 * (client, server, ports, transport, id) with the interface it was counted at;
 * its response is counted at that same interface, where the latency is
 * measured. Queries nobody answers are expired from user space (the timeout),
 * which takes them with an atomic lookup-and-delete, so a response racing the
 * expiry is counted either as answered or as unanswered, never both.
 *
 * Set from user space (-D): DNS_COUNT_SIZE, DNS_INFLIGHT_SIZE,
 * DNS_SAMPLE_THRESHOLD (a sampled query: prandom u32 below it, 0..2^32),
 * DNS_SAMPLE_BYTES (bytes of a sampled message copied out),
 * DNS_LATENCY_BASE_NS (upper bound of the first latency bucket; each next
 * bucket doubles it), DNS_LATENCY_BUCKETS.
 */
#ifndef FOVEA_DNS_H
#define FOVEA_DNS_H

#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define DNS_PORT 53
#define DNS_HEADER_LEN 12
#define DNS_MAX_NAME 255
#define DNS_MAX_LABELS 128 /* 255 bytes hold at most 127 labels */

#define DNS_QUERY 0
#define DNS_RESPONSE 1

#define DNS_AT_SOURCE 0      /* counted where the client (the query's sender) is */
#define DNS_AT_DESTINATION 1 /* counted where the server is */

/* Reject reasons (index into dns_rejects; names in agent/plugins/dns.py). */
#define DNS_REJECT_TRUNCATED 0  /* shorter than its header or question */
#define DNS_REJECT_TCP_LENGTH 1 /* TCP length prefix below a header's size */
#define DNS_REJECT_OPCODE 2     /* not a standard query */
#define DNS_REJECT_QDCOUNT 3    /* a query without exactly one question */
#define DNS_REJECT_NAME 4       /* a compression pointer, reserved label type or >255 bytes */
#define DNS_REJECT_DIRECTION 5  /* QR bit disagrees with the port: a "query" from port 53 */
/* Not rejects, but counted beside them. */
#define DNS_UNMATCHED 6      /* a response for a local client with no query in flight */
#define DNS_INFLIGHT_FULL 7  /* a query not tracked: no latency, no unanswered */
#define DNS_COUNTS_FULL 8    /* a message not counted: dns_counts is full */
#define DNS_STATS 9

struct dns_count_key {
    u8 family;
    u8 kind; /* DNS_QUERY / DNS_RESPONSE */
    u8 rcode; /* responses: the 4-bit header rcode */
    u8 transport; /* IPPROTO_UDP / IPPROTO_TCP */
    u16 qtype;
    u16 pad;
    u8 addr[16]; /* the local end: client at the source, server at the destination */
};

struct dns_flow {
    u8 family;
    u8 transport;
    u16 id;
    u16 client_port; /* host order */
    u16 server_port;
    u8 client[16];
    u8 server[16];
};

struct dns_query {
    u64 ts; /* bpf_ktime_get_ns() of the query */
    u32 ifindex; /* where it was counted: its response is counted there too */
    u16 qtype;
    u8 observer; /* DNS_AT_SOURCE / DNS_AT_DESTINATION */
    u8 sampled;
};

/* Header of a sampled message; the packet's first bytes follow it. */
struct dns_event {
    u64 ts;
    u64 latency; /* responses: ns since the query */
    u32 ifindex;
    u32 offset; /* where the DNS message starts in the bytes that follow */
    u32 length; /* the DNS message's length on the wire (may exceed what was copied) */
    u16 qtype;
    u8 kind;
    u8 rcode;
    u8 observer;
    u8 pad[3];
    struct dns_flow flow;
};

/* Kept across a restart (bpf/fovea.h): counts, queries in flight, the cumulative arrays. */
FOVEA_COUNTING_TABLE("percpu_hash", struct dns_count_key, struct fovea_counter, dns_counts, DNS_COUNT_SIZE);
FOVEA_COUNTING_TABLE("hash", struct dns_flow, struct dns_query, dns_inflight, DNS_INFLIGHT_SIZE);
FOVEA_COUNTING_TABLE("percpu_array", int, u64, dns_latency, DNS_LATENCY_BUCKETS + 2); /* buckets, +Inf, ns */
FOVEA_COUNTING_TABLE("percpu_array", int, u64, dns_stats, DNS_STATS);
BPF_PERF_OUTPUT(dns_events);

static __always_inline void dns_stat(int reason)
{
    fovea_map_op();
    u64 *v = dns_stats.lookup(&reason);
    if (v)
        *v += 1;
}

static __always_inline void dns_count(struct fovea_packet *pkt, u8 kind, u16 qtype, u8 rcode,
                                      u8 *local, u32 length)
{
    struct dns_count_key k = {.family = pkt->family, .kind = kind, .rcode = rcode,
                              .transport = pkt->l4proto, .qtype = qtype};
    __builtin_memcpy(k.addr, local, 16);
    struct fovea_counter zero = {};
    fovea_map_op();
    struct fovea_counter *c = dns_counts.lookup_or_try_init(&k, &zero);
    if (c) {
        c->packets += 1;
        c->bytes += length;
    } else {
        dns_stat(DNS_COUNTS_FULL);
    }
}

static __always_inline void dns_observe_latency(u64 ns)
{
    int slot = DNS_LATENCY_BUCKETS; /* +Inf */
    u64 bound = DNS_LATENCY_BASE_NS;
    for (int i = 0; i < DNS_LATENCY_BUCKETS; i++) {
        if (ns <= bound) {
            slot = i;
            break;
        }
        bound <<= 1;
    }
    u64 *v = dns_latency.lookup(&slot);
    if (v)
        *v += 1;
    int sum = DNS_LATENCY_BUCKETS + 1;
    v = dns_latency.lookup(&sum);
    if (v)
        *v += ns;
}

static __always_inline void dns_sample(struct __sk_buff *skb, struct dns_flow *flow, struct dns_query *q,
                                       u8 kind, u8 rcode, u64 now, u64 latency, u32 off, u32 end)
{
    struct dns_event ev = {.ts = now, .latency = latency, .ifindex = skb->ifindex, .offset = off,
                           .length = end - off, .qtype = q->qtype, .kind = kind, .rcode = rcode,
                           .observer = q->observer};
    ev.flow = *flow;
    u64 copy = off + DNS_SAMPLE_BYTES;
    if (copy > skb->len)
        copy = skb->len;
    dns_events.perf_submit_skb(skb, copy, &ev, sizeof(ev));
}

/* The qtype after the first QNAME at `off`, or -1 - the reject reason. */
static __always_inline int dns_qtype(struct __sk_buff *skb, u32 off, u32 end)
{
    u32 name_len = 0;
    int i;
#pragma clang loop unroll(disable)
    for (i = 0; i < DNS_MAX_LABELS; i++) {
        u8 len;
        if (off >= end || fovea_read(skb, off, &len, 1) < 0)
            return -1 - DNS_REJECT_TRUNCATED;
        off += 1;
        if (len == 0)
            break;
        if (len & 0xC0) /* a pointer (nothing earlier to point to) or a reserved type */
            return -1 - DNS_REJECT_NAME;
        name_len += len + 1;
        if (name_len > DNS_MAX_NAME)
            return -1 - DNS_REJECT_NAME;
        off += len;
    }
    if (i == DNS_MAX_LABELS)
        return -1 - DNS_REJECT_NAME;
    u16 qtype;
    if (off + 4 > end || fovea_read(skb, off, &qtype, 2) < 0) /* qtype and qclass */
        return -1 - DNS_REJECT_TRUNCATED;
    return bpf_ntohs(qtype);
}

static __always_inline void dns_flow_of(struct dns_flow *f, struct fovea_packet *pkt, u16 id, int query,
                                        u16 sport, u16 dport)
{
    f->family = pkt->family;
    f->transport = pkt->l4proto;
    f->id = id;
    if (query) {
        f->client_port = sport;
        f->server_port = dport;
        __builtin_memcpy(f->client, pkt->saddr, 16);
        __builtin_memcpy(f->server, pkt->daddr, 16);
    } else {
        f->client_port = dport;
        f->server_port = sport;
        __builtin_memcpy(f->client, pkt->daddr, 16);
        __builtin_memcpy(f->server, pkt->saddr, 16);
    }
}

/* Count one packet seen at an observation point. `local_sent`: the local end
 * (a pod, or the node at an uplink) sent it. The includer defines
 * dns_counted_elsewhere(skb, pkt, local_sent) before including this header:
 * true when another observation point of this node counts this packet. */
static __always_inline void fovea_dns(struct __sk_buff *skb, struct fovea_packet *pkt, int local_sent)
{
    if (!pkt->l4_offset || (pkt->l4proto != IPPROTO_UDP && pkt->l4proto != IPPROTO_TCP))
        return;
    u16 sport = pkt->sport, dport = pkt->dport; /* read once by fovea_tc_parse */
    if (sport != DNS_PORT && dport != DNS_PORT)
        return;

    u32 off, end = pkt->end;
    if (pkt->l4proto == IPPROTO_UDP) {
        off = pkt->l4_offset + sizeof(struct udphdr);
    } else {
        off = pkt->l4_offset + (pkt->tcp_doff >> 4) * 4;
        if (off >= end)
            return; /* no payload: handshake, ACK, FIN */
    }
    int seen = dns_counted_elsewhere(skb, pkt, local_sent);

    if (pkt->l4proto == IPPROTO_TCP) {
        /* The first segment of a message: a 2-byte length, then the message. */
        u16 len;
        if (off + 2 > end || fovea_read(skb, off, &len, 2) < 0) {
            if (!seen)
                dns_stat(DNS_REJECT_TRUNCATED);
            return;
        }
        off += 2;
        if (bpf_ntohs(len) < DNS_HEADER_LEN) {
            if (!seen)
                dns_stat(DNS_REJECT_TCP_LENGTH);
            return;
        }
        if (end > off + bpf_ntohs(len))
            end = off + bpf_ntohs(len);
    }

    struct {
        u16 id, flags, qdcount, ancount, nscount, arcount;
    } h;
    if (off + DNS_HEADER_LEN > end || fovea_read(skb, off, &h, DNS_HEADER_LEN) < 0) {
        if (!seen)
            dns_stat(DNS_REJECT_TRUNCATED);
        return;
    }
    u16 flags = bpf_ntohs(h.flags);
    int query = !(flags & 0x8000);
    int reject = -1;
    if (query ? dport != DNS_PORT : sport != DNS_PORT)
        reject = DNS_REJECT_DIRECTION;
    else if (((flags >> 11) & 0xF) != 0)
        reject = DNS_REJECT_OPCODE;
    else if (query && bpf_ntohs(h.qdcount) != 1)
        reject = DNS_REJECT_QDCOUNT;
    if (reject >= 0) {
        if (!seen)
            dns_stat(reject);
        return;
    }

    u64 now = fovea_now(pkt);
    struct dns_flow f = {};
    dns_flow_of(&f, pkt, bpf_ntohs(h.id), query, sport, dport);
    u8 *local = local_sent ? pkt->saddr : pkt->daddr;

    if (query) {
        if (seen)
            return;
        int qtype = dns_qtype(skb, off + DNS_HEADER_LEN, end);
        if (qtype < 0) {
            dns_stat(-1 - qtype);
            return;
        }

        dns_count(pkt, DNS_QUERY, qtype, 0, local, end - off);

        struct dns_query q = {.ts = now, .ifindex = skb->ifindex, .qtype = qtype,
                              .observer = local_sent ? DNS_AT_SOURCE : DNS_AT_DESTINATION,
                              .sampled = (u64)bpf_get_prandom_u32() < (u64)DNS_SAMPLE_THRESHOLD};
        fovea_map_op();
        if (dns_inflight.update(&f, &q) != 0)
            dns_stat(DNS_INFLIGHT_FULL);
        else if (q.sampled)
            dns_sample(skb, &f, &q, DNS_QUERY, 0, now, 0, off, end);
        return;
    }

    fovea_map_op();
    struct dns_query *found = dns_inflight.lookup(&f);
    if (!found) {
        /* Counted where it reaches its local client from outside the node: a
         * local server's response to a client elsewhere, or one seen again
         * at a second interface, is not counted twice. */
        if (!local_sent && !seen)
            dns_stat(DNS_UNMATCHED);
        return;
    }
    if (found->ifindex != skb->ifindex)
        return; /* its query was counted elsewhere: so is the response */
    struct dns_query q = *found;
    fovea_map_op();
    if (dns_inflight.delete(&f) != 0)
        return; /* expired meanwhile: counted as unanswered */
    u8 rcode = flags & 0xF;
    dns_count(pkt, DNS_RESPONSE, q.qtype, rcode, local, end - off);
    u64 latency = now > q.ts ? now - q.ts : 0;
    dns_observe_latency(latency);
    if (q.sampled)
        dns_sample(skb, &f, &q, DNS_RESPONSE, rcode, now, latency, off, end);
}

#endif
