from agent.events import DnsTransaction, EventHub


def dns(i: int) -> DnsTransaction:
    return DnsTransaction(start=float(i), duration=0.001, client="10.0.0.2", client_port=40000 + i,
                          server="10.0.0.53", server_port=53, transport="udp", id=i, qtype="A",
                          rcode="NOERROR", observer="source")


def test_every_subscriber_gets_every_record_in_order():
    hub = EventHub()
    a, b = hub.subscribe("otlp"), hub.subscribe("observe")
    for i in range(5):
        hub.publish(dns(i))
    assert [a.get(0).id for _ in range(5)] == [0, 1, 2, 3, 4]
    assert [b.get(0).id for _ in range(5)] == [0, 1, 2, 3, 4]
    assert a.get(0) is None


def test_a_full_queue_drops_and_counts_without_blocking():
    hub = EventHub()
    slow = hub.subscribe("slow", maxsize=3)
    fast = hub.subscribe("fast", maxsize=100)
    for i in range(10):
        hub.publish(dns(i))
    assert hub.dropped() == {"slow": 7, "fast": 0}
    assert [slow.get(0).id for _ in range(3)] == [0, 1, 2]
    hub.unsubscribe(slow)
    hub.publish(dns(10))
    assert hub.dropped() == {"fast": 0}
    assert fast.queue.qsize() == 11
