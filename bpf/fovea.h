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

/* Headers of one segment of a GSO skb: L3 header + L4 header. */
static __always_inline u32 fovea_l4_header_len(u8 l4proto, u8 tcp_doff_byte)
{
    if (l4proto == IPPROTO_TCP)
        return (tcp_doff_byte >> 4) * 4;
    if (l4proto == IPPROTO_UDP)
        return 8;
    return 0;
}

/* Packets and IP bytes of one skb seen by a tc program on an Ethernet
 * device; 0 packets for a non-IP frame. */
static __always_inline void fovea_tc_measure(struct __sk_buff *skb, u64 *packets, u64 *bytes)
{
    u32 l3 = ETH_HLEN, ip_len, l3_hdr;
    u8 l4proto;

    *packets = 0;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr iph;
        if (bpf_skb_load_bytes(skb, l3, &iph, sizeof(iph)) < 0)
            return;
        ip_len = bpf_ntohs(iph.tot_len);
        l3_hdr = iph.ihl * 4;
        l4proto = iph.protocol;
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)) < 0)
            return;
        ip_len = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
        l3_hdr = sizeof(ip6);
        l4proto = ip6.nexthdr;
    } else {
        return;
    }

    u32 segs = skb->gso_segs;
    if (segs <= 1) {
        *packets = 1;
        *bytes = ip_len;
        return;
    }
    /* A GSO skb: its IP length field may be 0 (BIG TCP), so take the skb
     * length, and add the headers every further segment carries. */
    u8 doff = 0;
    if (l4proto == IPPROTO_TCP)
        bpf_skb_load_bytes(skb, l3 + l3_hdr + 12, &doff, 1);
    u32 hdrs = l3_hdr + fovea_l4_header_len(l4proto, doff);
    *packets = segs;
    *bytes = (skb->len - l3) + (u64)(segs - 1) * hdrs;
}

#endif
