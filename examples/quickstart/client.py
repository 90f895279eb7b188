"""The official openai SDK pointed at sbactor: JSON, streaming and embeddings.

    python examples/quickstart/client.py [http://127.0.0.1:8080/v1]
"""

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
client = OpenAI(base_url=base_url, api_key="sk-sb-quickstart-alice")

reply = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
)
completion = reply.parse()
print("reply:", completion.choices[0].message.content)
print("served by:", reply.headers["x-sbactor-provider"], "cost:", reply.headers["x-sbactor-cost-usd"])

stream = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Stream a greeting"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\nusage: {chunk.usage.total_tokens} tokens")

embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
print("embedding dims:", len(embedding.data[0].embedding))
