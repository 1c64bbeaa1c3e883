"""The four tasks of `miaotui bench spec`: three that copy from their input (a support
answer from a FAQ, a code edit, fact extraction) and one that does not (a free story)."""

FAQ = """\
Lumen Home Hub - Frequently Asked Questions

1. What is the Lumen Home Hub?
The Lumen Home Hub is a small device that connects the lights, plugs, thermostats and door
sensors in your home. It works with Wi-Fi and with Zigbee devices, and it keeps working when
your internet connection is down, because every automation runs on the hub itself.

2. How do I set up the hub?
Plug the hub into power and into your router with the included network cable. Install the
Lumen app on your phone, create an account, and tap "Add hub". The app finds the hub on
your network within one minute. Setup takes about five minutes in total.

3. Why is the light on the hub blinking orange?
A blinking orange light means the hub has no internet connection. Check that the network
cable is connected and that your router is on. Automations keep running, but remote
control from outside your home is not available until the connection is back.

4. How do I reset the hub?
Press and hold the reset button on the back of the hub for ten seconds, until the light
turns white. A reset removes all devices and automations from the hub. Your account and
your backups in the cloud are kept, so you can restore them from the app.

5. How many devices can one hub control?
One hub controls up to 150 devices: up to 100 Zigbee devices and 50 Wi-Fi devices. If you
need more, you can add a second hub to the same account.

6. What is the warranty?
Every Lumen Home Hub comes with a two-year limited warranty that covers defects in
materials and workmanship. To make a claim, contact support with your order number and
the serial number printed on the bottom of the hub.

7. How do I return a hub?
You can return a hub within 30 days of delivery for a full refund, as long as it is in its
original packaging. Start a return from the Orders page of your account; we email you a
prepaid shipping label. Refunds are made within five business days of receiving the hub.

8. Does the hub work with voice assistants?
Yes. The hub works with Amazon Alexa, Google Assistant and Apple Home. Enable the Lumen
skill or integration in the voice assistant's app and sign in with your Lumen account.

9. How do I contact support?
Our support team answers by chat in the Lumen app every day from 8 am to 8 pm, and by email
at support@lumenhome.example within one business day.
"""

CODE = '''\
import json
import os


def load_records(path):
    """Read a JSON lines file and return the records as a list of dicts."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            records.append(json.loads(line))
    return records


def summarize(records):
    """Count the records per category and the total amount per category."""
    counts = {}
    totals = {}
    for record in records:
        category = record.get("category", "unknown")
        counts[category] = counts.get(category, 0) + 1
        totals[category] = totals.get(category, 0.0) + float(record.get("amount", 0))
    return counts, totals


def write_report(counts, totals, path):
    """Write one line per category: name, count and total amount."""
    with open(path, "w", encoding="utf-8") as f:
        for category in sorted(counts):
            f.write(f"{category}\\t{counts[category]}\\t{totals[category]:.2f}\\n")


if __name__ == "__main__":
    records = load_records(os.environ.get("INPUT", "records.jsonl"))
    counts, totals = summarize(records)
    write_report(counts, totals, os.environ.get("OUTPUT", "report.tsv"))
'''

PASSAGE = """\
The Eddystone Lighthouse stands on the Eddystone Rocks, fourteen kilometres south of
Plymouth in England. The first lighthouse on the rocks was built by Henry Winstanley and
first lit in 1698; it was destroyed in the great storm of 1703, with Winstanley inside. The
second, a wooden tower by John Rudyard, was lit in 1709 and burned down in 1755. The third,
by the engineer John Smeaton, was lit in 1759; Smeaton used dovetailed granite blocks and a
quick-setting lime that hardened under water. Smeaton's tower stood until the 1870s, when
the rock beneath it began to crack; its upper part was taken down and rebuilt on Plymouth
Hoe, where visitors can climb it today. The fourth and present lighthouse, designed by
James Douglass, was lit in 1882. It is 49 metres tall and has been automated since 1982.
"""

# (name, chat messages): the assistant's answer is decoded greedily
TASKS = {
    "faq": [{"role": "system", "content": "You are a support assistant. Answer using the FAQ below, "
                                          "quoting its wording.\n\n" + FAQ},
            {"role": "user", "content": "My hub's light keeps blinking orange and I also want to know "
                                        "how to return it. What should I do?"}],
    "code": [{"role": "user", "content": "Rewrite this Python code with the function `summarize` "
                                         "renamed to `summarize_by_category`. Output the whole code.\n\n"
                                         "```python\n" + CODE + "```"}],
    "facts": [{"role": "user", "content": "List every date and person mentioned in this passage, "
                                          "one fact per line, with the sentence it comes from.\n\n" + PASSAGE}],
    "story": [{"role": "user", "content": "Write a short story about a girl who finds a map in her "
                                          "grandmother's attic."}],
}
