from django.db import connection
from django.http import HttpResponse

from hello.models import Greeting


def index(request):
    greetings = ", ".join(greeting.text for greeting in Greeting.objects.order_by("id"))
    database = connection.settings_dict["NAME"]
    return HttpResponse(f"{greetings or 'no greetings'} (from {database})\n", content_type="text/plain")
