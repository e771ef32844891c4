/* Shared types and packet helpers for Fovea's programs.
 *
 * Counting rules (DESIGN.md): a packet is an IP packet on the wire, so a
 * GSO/GRO skb counts as max(1, gso_segs) packets; bytes are IP bytes, and
 * every segment of a GSO skb carries its own L3+L4 headers.
 */
#ifndef FOVEA_H
#define FOVEA_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#define FOVEA_INGRESS 0
#define FOVEA_EGRESS 1

struct fovea_counter {
    u64 packets;
    u64 bytes;
};

/* A map kept across a restart (a counting map, a ring buffer whose records
 * must not be lost): with lifecycle.keepAttached the agent pins these (and
 * only these) and the next agent adopts them, so that counts continue
 * (agent/compiler.py finds them by these names, agent/bpfobject.py pins them). */
#define FOVEA_COUNTING_TABLE(_type, _key, _leaf, _name, _size) BPF_TABLE(_type, _key, _leaf, _name, _size)
#define FOVEA_RINGBUF(_name, _pages) BPF_RINGBUF_OUTPUT(_name, _pages)

/* Map operations on the packet path, counted only in a test build
 * (-DFOVEA_COUNT_MAP_OPS), so that a test holds the programs to one lookup
 * per packet per hook (tests/kernel/test_map_ops.py). */
#ifdef FOVEA_COUNT_MAP_OPS
BPF_PERCPU_ARRAY(fovea_map_ops, u64, 1);
static __always_inline void fovea_map_op(void)
{
    int zero = 0;
    u64 *n = fovea_map_ops.lookup(&zero);
    if (n)
        *n += 1;
}
#else
static __always_inline void fovea_map_op(void) {}
#endif

/* Headers of one segment of a GSO skb: L3 header + L4 header. */
static __always_inline u32 fovea_l4_header_len(u8 l4proto, u8 tcp_doff_byte)
{
    if (l4proto == IPPROTO_TCP)
        return (tcp_doff_byte >> 4) * 4;
    if (l4proto == IPPROTO_UDP)
        return 8;
    return 0;
}

/* One skb seen by a tc program, measured by the counting rules. */
struct fovea_packet {
    u64 packets; /* 0 for a non-IP frame */
    u64 bytes;
    u8 family; /* 4 or 6 */
    u8 l4proto;
    u8 tcp_flags; /* TCP: the flags byte */
    u8 tcp_doff;  /* TCP: the data-offset byte (header length in its high nibble) */
    u16 sport;    /* TCP/UDP, host order; 0 in a non-first fragment or when unreadable */
    u16 dport;
    u16 tcp_seq_lo; /* TCP: the sequence number's low 16 bits (a SYN's tell two attempts apart) */
    u8 saddr[16]; /* IPv4 in the first 4 bytes */
    u8 daddr[16];
    u32 l4_offset; /* where the L4 header starts; 0 in a non-first IPv4 fragment */
    u32 end;       /* where the IP packet ends (Ethernet padding excluded) */
    u64 now;       /* bpf_ktime_get_ns() once read (fovea_now): one clock read per packet */
};

/* The packet's time, read from the clock once: the flow table and DNS share it. */
static __always_inline u64 fovea_now(struct fovea_packet *pkt)
{
    if (!pkt->now)
        pkt->now = bpf_ktime_get_ns();
    return pkt->now;
}

/* Copy len bytes at off into dst: in place when they are in the linear part
 * of the skb (almost always: a helper call costs more than the read), else
 * with bpf_skb_load_bytes. In place up to FOVEA_READ_MAX_OFF, which bounds
 * the offset for the verifier and reaches the end of a DNS question after
 * IPv6 and TCP options. */
#define FOVEA_READ_MAX_OFF 511 /* 2^n - 1: also the mask */
static __always_inline int fovea_read(struct __sk_buff *skb, u32 off, void *dst, u32 len)
{
    void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
    if (off <= FOVEA_READ_MAX_OFF) {
        /* The compiler may test a copy of off; the mask bounds the register
         * that is added to the packet pointer, and the empty asm keeps the
         * compiler from dropping the mask as redundant. */
        asm volatile("" : "+r"(off));
        off &= FOVEA_READ_MAX_OFF;
        if (data + off + len <= data_end) {
            __builtin_memcpy(dst, data + off, len);
            return 0;
        }
    }
    return bpf_skb_load_bytes(skb, off, dst, len);
}

/* Parse an skb on an Ethernet device, where the packet starts with the MAC
 * header. Returns 0 for a non-IP frame or one too short to read. */
static __always_inline int fovea_tc_parse(struct __sk_buff *skb, struct fovea_packet *pkt)
{
    u32 l3 = ETH_HLEN, ip_len, l3_hdr;

    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr iph;
        if (fovea_read(skb, l3, &iph, sizeof(iph)) < 0)
            return 0;
        ip_len = bpf_ntohs(iph.tot_len);
        l3_hdr = iph.ihl * 4;
        pkt->family = 4;
        pkt->l4proto = iph.protocol;
        if (!(iph.frag_off & bpf_htons(0x1fff)))
            pkt->l4_offset = l3 + l3_hdr;
        __builtin_memcpy(pkt->saddr, &iph.saddr, 4);
        __builtin_memcpy(pkt->daddr, &iph.daddr, 4);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (fovea_read(skb, l3, &ip6, sizeof(ip6)) < 0)
            return 0;
        ip_len = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
        l3_hdr = sizeof(ip6);
        pkt->family = 6;
        pkt->l4proto = ip6.nexthdr;
        pkt->l4_offset = l3 + l3_hdr;
        __builtin_memcpy(pkt->saddr, &ip6.saddr, 16);
        __builtin_memcpy(pkt->daddr, &ip6.daddr, 16);
    } else {
        return 0;
    }

    /* Ports and TCP flags, read once for the flow table and the DNS check. */
    if (pkt->l4_offset && (pkt->l4proto == IPPROTO_TCP || pkt->l4proto == IPPROTO_UDP)) {
        u8 l4[14] = {};
        u32 off = pkt->l4_offset & 0xff; /* at most 14 + 60 */
        int rc = pkt->l4proto == IPPROTO_TCP ? fovea_read(skb, off, l4, 14) : fovea_read(skb, off, l4, 4);
        if (rc == 0) {
            pkt->sport = ((u16)l4[0] << 8) | l4[1];
            pkt->dport = ((u16)l4[2] << 8) | l4[3];
            pkt->tcp_seq_lo = ((u16)l4[6] << 8) | l4[7];
            pkt->tcp_doff = l4[12];
            pkt->tcp_flags = l4[13];
        }
    }

    /* A length field of 0 (BIG TCP): the packet runs to the end of the skb. */
    pkt->end = (pkt->family == 4 ? ip_len : ip_len - l3_hdr) ? l3 + ip_len : skb->len;
    if (pkt->end > skb->len)
        pkt->end = skb->len;
    u32 segs = skb->gso_segs;
    if (segs <= 1) {
        pkt->packets = 1;
        pkt->bytes = ip_len;
        return 1;
    }
    /* A GSO skb: its IP length field may be 0 (BIG TCP), so take the skb
     * length, and add the headers every further segment carries. */
    u32 hdrs = l3_hdr + fovea_l4_header_len(pkt->l4proto, pkt->tcp_doff);
    pkt->packets = segs;
    pkt->bytes = (skb->len - l3) + (u64)(segs - 1) * hdrs;
    return 1;
}

static __always_inline void fovea_add(struct fovea_counter *c, struct fovea_packet *pkt)
{
    if (c) {
        c->packets += pkt->packets;
        c->bytes += pkt->bytes;
    }
}

#endif
