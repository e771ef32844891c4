/* The reference for bench/datapath_cost.py: the least a flow-counting tc
 * program does. It parses Ethernet, IPv4/IPv6 and the ports in place and adds
 * the packet to a per-CPU hash keyed by the 5-tuple (one hash operation).
 * `empty` is the hook's own cost: a program that does nothing.
 * Both let every packet go on (TC_ACT_UNSPEC, which tcx reads as TCX_NEXT).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

struct tuple {
    u8 family;
    u8 proto;
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

struct counter {
    u64 packets;
    u64 bytes;
};

BPF_PERCPU_HASH(tuples, struct tuple, struct counter, 65536);

int reference(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct tuple t = {};
    void *l4;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + ETH_HLEN;
        if ((void *)(ip + 1) > end)
            return TC_ACT_UNSPEC;
        t.family = 4;
        t.proto = ip->protocol;
        __builtin_memcpy(t.saddr, &ip->saddr, 4);
        __builtin_memcpy(t.daddr, &ip->daddr, 4);
        l4 = (void *)ip + ip->ihl * 4;
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        if ((void *)(ip6 + 1) > end)
            return TC_ACT_UNSPEC;
        t.family = 6;
        t.proto = ip6->nexthdr;
        __builtin_memcpy(t.saddr, &ip6->saddr, 16);
        __builtin_memcpy(t.daddr, &ip6->daddr, 16);
        l4 = ip6 + 1;
    } else {
        return TC_ACT_UNSPEC;
    }
    if ((t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP) && l4 + 4 <= end) {
        t.sport = *(u16 *)l4;
        t.dport = *(u16 *)(l4 + 2);
    }
    u64 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    struct counter *c = tuples.lookup(&t);
    if (c) {
        c->packets += segs;
        c->bytes += skb->len;
    } else {
        struct counter init = {segs, skb->len};
        tuples.update(&t, &init);
    }
    return TC_ACT_UNSPEC;
}

int empty(struct __sk_buff *skb)
{
    return TC_ACT_UNSPEC;
}
