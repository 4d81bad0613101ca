from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.parsers import JSONParser


class LimitedJSONParser(JSONParser):
    """JSON, refused with 413 past AM_MAX_BODY_BYTES even without a Content-Length."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = (parser_context or {}).get("request")
        length = request.META.get("CONTENT_LENGTH") if request is not None else None
        if length and length.isdigit() and int(length) > limit:
            raise RequestDataTooBig()
        if stream is None:
            return super().parse(stream, media_type, parser_context)
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise RequestDataTooBig()
        import io

        return super().parse(io.BytesIO(body), media_type, parser_context)
