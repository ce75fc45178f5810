"""The prompt formats of the feedback roles: critique, revision, comparison, and a question about a request.

The one place these formats live: the world's demonstrations teach a tiny model to play the roles in exactly these
formats, and the critique_revise and label_preferences steps ask the feedback model in exactly these formats.
Each function returns the content of one user message; the assistant's reply is the critique, the revision, or one
option letter.
"""

OPTIONS = ("A", "B")


def critique_prompt(prompt: str, response: str, request: str) -> str:
    return f"Conversation:\nUser: {prompt}\nAssistant: {response}\n\nCritique request: {request}"


def revision_prompt(prompt: str, response: str, critique: str, request: str) -> str:
    return (f"Conversation:\nUser: {prompt}\nAssistant: {response}\n\nCritique: {critique}\n"
            f"Revision request: {request}")


def request_prompt(prompt: str, question: str) -> str:
    """A yes-or-no question about the request alone; the reply is one option letter, A for yes."""
    return f"Request: {prompt}\n\nQuestion: {question}\nAnswer with A for yes or B for no."


def comparison_prompt(prompt: str, response_a: str, response_b: str, principle: str) -> str:
    return (f"Conversation:\nUser: {prompt}\nResponse (A): {response_a}\nResponse (B): {response_b}\n\n"
            f"Question: {principle}\nAnswer with A or B.")
